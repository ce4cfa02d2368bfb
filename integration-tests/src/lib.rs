//! The wiremesh virtual cluster: a real kube-apiserver (testenv), nodes as network namespaces joined by
//! an underlay bridge, pods as namespaces behind veths, and real agents. Built by the mesh issue.
