package azurefake

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// CAFileName is the name NewTLS gives the CA certificate inside its directory.
const CAFileName = "azurefake-ca.pem"

// NewTLS creates a throwaway certificate authority and a server certificate signed by it, valid
// for 127.0.0.1, ::1, localhost and any extra hosts (names or IP addresses, e.g. the address the
// fake ARM listens on inside a test network namespace). The CA is written as PEM to
// dir/azurefake-ca.pem and its path returned, because the agent takes a CA file
// (ipam.azure.caFile) rather than a pool.
//
// ARM must be served over HTTPS: azcore's bearer-token policy refuses to send a token over plain
// http (unless a client opts into InsecureAllowCredentialWithHTTP, which the agent must not need).
func NewTLS(dir string, extraHosts ...string) (serverTLS *tls.Config, caFile string, err error) {
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, "", err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "azurefake test CA"},
		NotBefore:             now.Add(-time.Hour), // tolerate small clock differences
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, "", err
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, "", err
	}

	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, "", err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "management.azurefake.test"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	for _, h := range extraHosts {
		if ip := net.ParseIP(h); ip != nil {
			srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, ip)
		} else {
			srvTmpl.DNSNames = append(srvTmpl.DNSNames, h)
		}
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, "", err
	}

	caFile = filepath.Join(dir, CAFileName)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(caFile, caPEM, 0o644); err != nil {
		return nil, "", err
	}
	serverTLS = &tls.Config{
		MinVersion: tls.VersionTLS12,
		Certificates: []tls.Certificate{{
			Certificate: [][]byte{srvDER, caDER},
			PrivateKey:  srvKey,
		}},
	}
	return serverTLS, caFile, nil
}

// NewHTTPClient returns an HTTP client that trusts only the CA in caFile. It implements azcore's
// policy.Transporter, so tests pass it as ClientOptions.Transport to talk to the fake ARM the way
// the agent does with ipam.azure.caFile.
func NewHTTPClient(caFile string) (*http.Client, error) {
	pemBytes, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemBytes) {
		return nil, fmt.Errorf("%s: %w", caFile, errors.New("no PEM certificate found"))
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	// Never go through a proxy from the environment: the fakes are always local.
	tr.Proxy = nil
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		// crypto/rand never fails on Linux; a fixed serial would still give a valid certificate.
		return big.NewInt(1)
	}
	return n
}
