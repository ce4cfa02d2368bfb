// The embedded single-member etcd behind the apiserver.

package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/klog/v2"
)

type etcdServer struct {
	e         *embed.Etcd
	clientURL string
}

// freeLoopbackPort asks the kernel for a free port on 127.0.0.1. Another process may take it before
// etcd binds it; startEtcd retries with new ports when that happens.
func freeLoopbackPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func startEtcd(dir string) (*etcdServer, error) {
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		s, err := tryStartEtcd(dir)
		if err == nil {
			return s, nil
		}
		lastErr = err
		klog.InfoS("etcd did not start, retrying with other ports", "attempt", attempt+1, "err", err)
	}
	return nil, lastErr
}

func tryStartEtcd(dir string) (*etcdServer, error) {
	clientPort, err := freeLoopbackPort()
	if err != nil {
		return nil, err
	}
	peerPort, err := freeLoopbackPort()
	if err != nil {
		return nil, err
	}
	clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(clientPort))}
	peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(peerPort))}

	cfg := embed.NewConfig()
	cfg.Name = "testenv"
	cfg.Dir = dir
	// Test data: losing it on a power cut is fine, and fsync makes every write slow on a shared disk.
	cfg.UnsafeNoFsync = true
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"}

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd on %s: %w", clientURL.Host, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd on %s failed while starting: %w", clientURL.Host, err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, errors.New("etcd was not ready within 60s")
	}
	klog.InfoS("etcd ready", "clientURL", clientURL.String(), "dir", dir)
	return &etcdServer{e: e, clientURL: clientURL.String()}, nil
}

func (s *etcdServer) stop() {
	s.e.Close()
	klog.InfoS("etcd stopped")
}
