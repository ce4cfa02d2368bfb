{{/* Labels every object carries. */}}
{{- define "wiremesh.labels" -}}
app.kubernetes.io/name: wiremesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: wiremesh
{{- end }}

{{/* The DaemonSet's selector: stable across upgrades (a selector is immutable). */}}
{{- define "wiremesh.selectorLabels" -}}
app.kubernetes.io/name: wiremesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{/* Prefix of cluster-scoped names: "wiremesh" for a release named wiremesh, else "<release>-wiremesh". */}}
{{- define "wiremesh.fullname" -}}
{{- if eq .Release.Name "wiremesh" -}}wiremesh{{- else -}}{{ printf "%s-wiremesh" .Release.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end }}

{{/* The agent's user name as the apiserver sees it. */}}
{{- define "wiremesh.agentUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:{{ .Values.serviceAccount.name }}
{{- end }}

{{- define "wiremesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* kernel | userspace | auto, as `mesh-agent run --datapath` spells it. */}}
{{- define "wiremesh.datapathFlag" -}}
{{- $d := .Values.meshEncryption.datapath | lower -}}
{{- if not (has $d (list "auto" "kernel" "userspace")) -}}
{{- fail (printf "meshEncryption.datapath must be Auto, Kernel or Userspace, not %q" .Values.meshEncryption.datapath) -}}
{{- end -}}
{{ $d }}
{{- end }}
