// Certificates, keys and the static token file testenv generates at every start.

package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// pkiFiles are the paths and the CA certificate testenv hands to the apiserver and to clients.
type pkiFiles struct {
	caPEM     []byte
	caFile    string
	certFile  string
	keyFile   string
	saKeyFile string
}

// firstServiceIP is the ClusterIP of the "kubernetes" Service for --service-cluster-ip-range below; it
// goes into the serving certificate like kubeadm does.
var (
	serviceCIDR    = "10.96.0.0/16"
	firstServiceIP = net.IPv4(10, 96, 0, 1)
)

func generatePKI(dir string, listen net.IP) (*pkiFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	now := time.Now()

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTemplate := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "wiremesh-testenv-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}

	ips := []net.IP{listen, net.IPv4(127, 0, 0, 1), firstServiceIP}
	servingKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	servingTemplate := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{
			"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: ips,
	}
	servingDER, err := x509.CreateCertificate(rand.Reader, servingTemplate, caCert, &servingKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("serving certificate: %w", err)
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}

	files := &pkiFiles{
		caPEM:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		caFile:    filepath.Join(dir, "ca.crt"),
		certFile:  filepath.Join(dir, "apiserver.crt"),
		keyFile:   filepath.Join(dir, "apiserver.key"),
		saKeyFile: filepath.Join(dir, "service-account.key"),
	}
	if err := os.WriteFile(files.caFile, files.caPEM, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(files.certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: servingDER}), 0o644); err != nil {
		return nil, err
	}
	if err := writeECKey(files.keyFile, servingKey); err != nil {
		return nil, err
	}
	if err := writeECKey(files.saKeyFile, saKey); err != nil {
		return nil, err
	}
	return files, nil
}

func writeECKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

func randomSerial() *big.Int {
	limit := new(big.Int).Lsh(big.NewInt(1), 127)
	n, err := rand.Int(rand.Reader, limit)
	if err != nil {
		panic(fmt.Sprintf("reading random bytes: %v", err))
	}
	return n.Add(n, big.NewInt(1))
}

// userCredential is one static-token user.
type userCredential struct {
	User   string   `json:"user"`
	Groups []string `json:"groups"`
	Token  string   `json:"token"`
}

// credentials are all static-token users, as written to --credentials-out.
type credentials struct {
	tokenFile string
	Admin     userCredential            `json:"admin"`
	Nodes     map[string]userCredential `json:"nodes"`
}

func randomToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// generateTokens writes the apiserver's --token-auth-file: token,user,uid,"group1,group2" per line.
func generateTokens(path string, nodes []string) (*credentials, error) {
	creds := &credentials{tokenFile: path, Nodes: map[string]userCredential{}}
	token, err := randomToken()
	if err != nil {
		return nil, err
	}
	creds.Admin = userCredential{User: "wiremesh-admin", Groups: []string{"system:masters"}, Token: token}
	var b strings.Builder
	fmt.Fprintf(&b, "%s,%s,%s,\"%s\"\n", token, creds.Admin.User, "uid-admin", strings.Join(creds.Admin.Groups, ","))
	for _, n := range nodes {
		token, err := randomToken()
		if err != nil {
			return nil, err
		}
		c := userCredential{User: "system:node:" + n, Groups: []string{"system:nodes"}, Token: token}
		creds.Nodes[n] = c
		fmt.Fprintf(&b, "%s,%s,%s,\"%s\"\n", token, c.User, "uid-node-"+n, strings.Join(c.Groups, ","))
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return nil, err
	}
	return creds, nil
}
