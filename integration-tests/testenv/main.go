// Command testenv runs a real kube-apiserver (linked from k8s.io/kubernetes) on an embedded etcd, for
// wiremesh's virtual cluster: the envtest idea, built from source.
//
// It generates a CA and a serving certificate for the listen addresses, a static token file with an
// admin user (group system:masters) and one system:node:<name> user per --nodes entry (group
// system:nodes), service-account signing keys, and runs the apiserver with
// --authorization-mode=Node,RBAC and the default admission plugins plus NodeRestriction (which
// kube-apiserver does not enable by default), so a node can modify only its own Node object.
//
// Protocol with the parent process:
//   - stdout carries exactly one line, "READY <admin-kubeconfig-path>", printed once /readyz is ok and
//     the default namespace exists. Everything else (apiserver and etcd logs) goes to stderr.
//   - the admin kubeconfig (--kubeconfig) and the credentials JSON (--credentials-out: server URL, CA
//     PEM, admin and per-node tokens) are written atomically (temp file + rename) before READY.
//   - SIGTERM, SIGINT, or end of file on stdin (unless --watch-stdin=false) shut the apiserver and etcd
//     down; a data directory that testenv created itself is then removed. Exit status 0 means a clean
//     shutdown.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string { return strings.Join(*s, " ") }

func (s *stringList) Set(v string) error {
	*s = append(*s, v)
	return nil
}

type options struct {
	listenAddress  net.IP
	port           int
	dataDir        string
	kubeconfig     string
	credentialsOut string
	nodes          []string
	watchStdin     bool
	readyTimeout   time.Duration
	apiserverArgs  []string
}

func parseOptions(args []string) (*options, error) {
	fs := flag.NewFlagSet("testenv", flag.ContinueOnError)
	listen := fs.String("listen-address", "127.0.0.1", "IPv4 address to serve on (a host address the node namespaces can reach, e.g. the underlay bridge IP); 127.0.0.1 is served too when possible")
	port := fs.Int("port", 0, "TCP port to serve on, 0 picks a free one")
	dataDir := fs.String("data-dir", "", "directory for etcd data, certificates and the token file; default a temporary directory that is removed at exit")
	kubeconfig := fs.String("kubeconfig", "", "path of the admin kubeconfig to write (default <data-dir>/admin.kubeconfig)")
	credsOut := fs.String("credentials-out", "", "path of the credentials JSON to write (default <data-dir>/credentials.json)")
	nodes := fs.String("nodes", "", "comma-separated node names; each gets a bearer token for user system:node:<name> in group system:nodes")
	watchStdin := fs.Bool("watch-stdin", true, "shut down when stdin reaches end of file")
	readyTimeout := fs.Duration("ready-timeout", 3*time.Minute, "give up when the apiserver is not ready within this time")
	var extra stringList
	fs.Var(&extra, "apiserver-arg", "extra kube-apiserver flag, e.g. --apiserver-arg=--v=2 (repeatable)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() != 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	ip := net.ParseIP(*listen).To4()
	if ip == nil {
		return nil, fmt.Errorf("--listen-address %q is not an IPv4 address", *listen)
	}
	if *port < 0 || *port > 65535 {
		return nil, fmt.Errorf("--port %d out of range", *port)
	}
	var nodeNames []string
	seen := map[string]bool{}
	for _, n := range strings.Split(*nodes, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		if seen[n] {
			return nil, fmt.Errorf("--nodes: %q given twice", n)
		}
		if strings.ContainsAny(n, ",\" \n") {
			return nil, fmt.Errorf("--nodes: %q is not a valid node name", n)
		}
		seen[n] = true
		nodeNames = append(nodeNames, n)
	}
	return &options{
		listenAddress:  ip,
		port:           *port,
		dataDir:        *dataDir,
		kubeconfig:     *kubeconfig,
		credentialsOut: *credsOut,
		nodes:          nodeNames,
		watchStdin:     *watchStdin,
		readyTimeout:   *readyTimeout,
		apiserverArgs:  extra,
	}, nil
}

func main() {
	opts, err := parseOptions(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "testenv: %v\n", err)
		os.Exit(2)
	}
	os.Exit(run(opts))
}

// run returns the process exit status.
func run(opts *options) int {
	// After READY nobody may read stdout any more (a parent that left testenv running has exited);
	// a later write must fail with EPIPE rather than kill the process.
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if opts.watchStdin {
		go func() {
			// Any input is ignored; only end of file (the parent closed our stdin or died) matters.
			_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
			cancel(errors.New("stdin closed"))
		}()
	}

	ownDataDir := false
	if opts.dataDir == "" {
		dir, err := os.MkdirTemp("", "wiremesh-testenv-")
		if err != nil {
			klog.ErrorS(err, "creating a temporary data directory")
			return 1
		}
		opts.dataDir = dir
		ownDataDir = true
	} else if err := os.MkdirAll(opts.dataDir, 0o700); err != nil {
		klog.ErrorS(err, "creating the data directory", "dir", opts.dataDir)
		return 1
	}
	if opts.kubeconfig == "" {
		opts.kubeconfig = opts.dataDir + "/admin.kubeconfig"
	}
	if opts.credentialsOut == "" {
		opts.credentialsOut = opts.dataDir + "/credentials.json"
	}

	status := serve(ctx, cancel, opts)

	if ownDataDir {
		if err := os.RemoveAll(opts.dataDir); err != nil {
			klog.ErrorS(err, "removing the data directory", "dir", opts.dataDir)
			status = 1
		}
	}
	klog.InfoS("testenv stopped", "status", status)
	klog.Flush()
	return status
}

// serve starts etcd and the apiserver, announces readiness, and blocks until ctx ends or the apiserver
// fails. It returns the exit status.
func serve(ctx context.Context, cancel context.CancelCauseFunc, opts *options) int {
	pki, err := generatePKI(opts.dataDir+"/pki", opts.listenAddress)
	if err != nil {
		klog.ErrorS(err, "generating certificates")
		return 1
	}
	creds, err := generateTokens(opts.dataDir+"/tokens.csv", opts.nodes)
	if err != nil {
		klog.ErrorS(err, "generating the token file")
		return 1
	}

	etcd, err := startEtcd(opts.dataDir + "/etcd")
	if err != nil {
		klog.ErrorS(err, "starting etcd")
		return 1
	}
	defer etcd.stop()

	ln, err := listen(opts.listenAddress, opts.port)
	if err != nil {
		klog.ErrorS(err, "listening", "address", opts.listenAddress.String(), "port", opts.port)
		return 1
	}
	port := ln.Addr().(*net.TCPAddr).Port
	server := "https://" + net.JoinHostPort(opts.listenAddress.String(), strconv.Itoa(port))

	apiserver, err := startAPIServer(ctx, apiserverArgs(opts, pki, creds, etcd.clientURL), ln)
	if err != nil {
		klog.ErrorS(err, "starting kube-apiserver")
		_ = ln.Close()
		return 1
	}

	status := 0
	readyCtx, readyCancel := context.WithTimeout(ctx, opts.readyTimeout)
	err = waitReady(readyCtx, server, pki.caPEM, creds.Admin.Token, apiserver.done)
	readyCancel()
	if err == nil {
		err = writeOutputs(opts, server, pki, creds)
	}
	if err == nil {
		// The one line the parent waits for; nothing else is ever written to stdout.
		fmt.Printf("READY %s\n", opts.kubeconfig)
		klog.InfoS("testenv ready", "server", server, "kubeconfig", opts.kubeconfig, "nodes", len(opts.nodes))
	} else if ctx.Err() == nil {
		klog.ErrorS(err, "kube-apiserver did not become ready")
		status = 1
	}

	if status == 0 {
		select {
		case <-ctx.Done():
		case <-apiserver.done:
			// The apiserver stopped although nobody asked it to.
			klog.ErrorS(apiserver.err, "kube-apiserver exited on its own")
			status = 1
		}
	}
	klog.InfoS("shutting down", "reason", fmt.Sprint(context.Cause(ctx)))
	cancel(errors.New("shutting down"))

	select {
	case <-apiserver.done:
		if apiserver.err != nil && status == 0 {
			klog.ErrorS(apiserver.err, "kube-apiserver shutdown")
			status = 1
		}
	case <-time.After(60 * time.Second):
		klog.ErrorS(nil, "kube-apiserver did not stop within 60s")
		status = 1
	}
	return status
}
