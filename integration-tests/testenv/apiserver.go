// The in-process kube-apiserver: flags, listeners, readiness, and the files clients need.

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/spf13/pflag"
	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// apiserverArgs are the kube-apiserver flags testenv runs with; --apiserver-arg values come last so
// they can override any of them.
func apiserverArgs(opts *options, pki *pkiFiles, creds *credentials, etcdURL string) []string {
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--tls-cert-file=" + pki.certFile,
		"--tls-private-key-file=" + pki.keyFile,
		"--token-auth-file=" + creds.tokenFile,
		"--authorization-mode=Node,RBAC",
		// Not in kube-apiserver's default set (kubeadm adds it the same way): without it the Node
		// authorizer lets any node update or patch any Node object.
		"--enable-admission-plugins=NodeRestriction",
		"--service-account-key-file=" + pki.saKeyFile,
		"--service-account-signing-key-file=" + pki.saKeyFile,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=" + serviceCIDR,
		"--advertise-address=" + opts.listenAddress.String(),
		// No other apiserver shares this etcd, and the "kubernetes" Service endpoints are not used.
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--cert-dir=" + filepath.Dir(pki.certFile),
		"--profiling=false",
	}
	return append(args, opts.apiserverArgs...)
}

// apiserverRun is a running apiserver; done is closed when it has returned, with err set.
type apiserverRun struct {
	done chan struct{}
	err  error
}

// startAPIServer parses args like the kube-apiserver command does and runs the server on ln until ctx
// ends.
func startAPIServer(ctx context.Context, args []string, ln net.Listener) (*apiserverRun, error) {
	s := apiserveroptions.NewServerRunOptions()
	featureGate := s.GenericServerRunOptions.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)

	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, f := range s.Flags().FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("kube-apiserver flags: %w", err)
	}
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, err
	}
	// The loopback clients must not log warnings the server issues to itself.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return nil, err
	}

	s.SecureServing.Listener = ln
	s.SecureServing.BindPort = ln.Addr().(*net.TCPAddr).Port

	completed, err := s.Complete(ctx)
	if err != nil {
		return nil, err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return nil, utilerrors.NewAggregate(errs)
	}
	if mutable, ok := featureGate.(featuregate.MutableFeatureGate); ok {
		mutable.AddMetrics()
	}

	run := &apiserverRun{done: make(chan struct{})}
	go func() {
		defer close(run.done)
		run.err = app.Run(ctx, completed)
	}()
	return run, nil
}

// listen opens the serving listener on ip:port and, when ip is not loopback, on 127.0.0.1 with the same
// port as well (best effort: a taken loopback port only costs the loopback address).
func listen(ip net.IP, port int) (net.Listener, error) {
	primary, err := net.Listen("tcp4", net.JoinHostPort(ip.String(), strconv.Itoa(port)))
	if err != nil {
		return nil, err
	}
	if ip.IsLoopback() {
		return primary, nil
	}
	chosen := primary.Addr().(*net.TCPAddr).Port
	loopback, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(chosen)))
	if err != nil {
		klog.InfoS("not serving on 127.0.0.1", "port", chosen, "err", err)
		return primary, nil
	}
	return newMultiListener(primary, loopback), nil
}

// multiListener accepts from several listeners; Addr is the first one's.
type multiListener struct {
	listeners []net.Listener
	accepted  chan acceptResult
	closed    chan struct{}
	closeOnce sync.Once
}

type acceptResult struct {
	conn net.Conn
	err  error
}

func newMultiListener(ls ...net.Listener) *multiListener {
	m := &multiListener{listeners: ls, accepted: make(chan acceptResult), closed: make(chan struct{})}
	for _, l := range ls {
		go m.acceptLoop(l)
	}
	return m
}

func (m *multiListener) acceptLoop(l net.Listener) {
	for {
		conn, err := l.Accept()
		select {
		case m.accepted <- acceptResult{conn, err}:
		case <-m.closed:
			if conn != nil {
				_ = conn.Close()
			}
			return
		}
		if err != nil {
			return
		}
	}
}

func (m *multiListener) Accept() (net.Conn, error) {
	select {
	case r := <-m.accepted:
		return r.conn, r.err
	case <-m.closed:
		return nil, net.ErrClosed
	}
}

func (m *multiListener) Close() error {
	var errs []error
	m.closeOnce.Do(func() {
		close(m.closed)
		for _, l := range m.listeners {
			errs = append(errs, l.Close())
		}
	})
	return errors.Join(errs...)
}

func (m *multiListener) Addr() net.Addr { return m.listeners[0].Addr() }

func clientConfig(server string, caPEM []byte, token string) *rest.Config {
	return &rest.Config{
		Host:            server,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: caPEM},
		Timeout:         10 * time.Second,
	}
}

// waitReady polls /readyz as the admin, through the same address, CA and token clients use, then
// waits for the default namespace (created by a bootstrap controller shortly after readiness).
func waitReady(ctx context.Context, server string, caPEM []byte, token string, done <-chan struct{}) error {
	client, err := kubernetes.NewForConfig(clientConfig(server, caPEM, token))
	if err != nil {
		return err
	}
	var last error
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last check: %v)", context.Cause(ctx), last)
		case <-done:
			return errors.New("kube-apiserver exited before it was ready")
		case <-tick.C:
		}
		status := 0
		result := client.CoreV1().RESTClient().Get().AbsPath("/readyz").Do(ctx).StatusCode(&status)
		if status != http.StatusOK {
			last = fmt.Errorf("/readyz: status %d: %v", status, result.Error())
			continue
		}
		if _, err := client.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{}); err != nil {
			last = fmt.Errorf("namespace default: %w", err)
			continue
		}
		return nil
	}
}

// credentialsFile is the JSON written to --credentials-out.
type credentialsFile struct {
	Server string                    `json:"server"`
	CAPEM  string                    `json:"caPEM"`
	CAFile string                    `json:"caFile"`
	Admin  userCredential            `json:"admin"`
	Nodes  map[string]userCredential `json:"nodes"`
}

func writeOutputs(opts *options, server string, pki *pkiFiles, creds *credentials) error {
	kubeconfig := clientcmdapi.NewConfig()
	kubeconfig.Clusters["testenv"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: pki.caPEM}
	kubeconfig.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: creds.Admin.Token}
	kubeconfig.Contexts["testenv"] = &clientcmdapi.Context{Cluster: "testenv", AuthInfo: "admin"}
	kubeconfig.CurrentContext = "testenv"
	data, err := clientcmd.Write(*kubeconfig)
	if err != nil {
		return err
	}
	if err := writeAtomic(opts.kubeconfig, data); err != nil {
		return fmt.Errorf("writing the kubeconfig: %w", err)
	}

	data, err = json.MarshalIndent(credentialsFile{
		Server: server,
		CAPEM:  string(pki.caPEM),
		CAFile: pki.caFile,
		Admin:  creds.Admin,
		Nodes:  creds.Nodes,
	}, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(opts.credentialsOut, append(data, '\n')); err != nil {
		return fmt.Errorf("writing the credentials: %w", err)
	}
	return nil
}

// writeAtomic writes data with mode 0600 under a temporary name in the same directory and renames it,
// so a reader sees either no file or the whole file.
func writeAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	cleanup := func(err error) error {
		_ = f.Close()
		_ = os.Remove(tmp)
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		return cleanup(err)
	}
	if _, err := f.Write(data); err != nil {
		return cleanup(err)
	}
	if err := f.Sync(); err != nil {
		return cleanup(err)
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return nil
}
