package nbd

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
	"os"
	"path/filepath"
	"time"
)

// File names in a TLS directory, as nbdkit --tls-certificates, qemu's
// tls-creds-x509 and libnbd's tls-certificates expect them. The server
// side is in the directory itself; the client side in ClientDir under it.
const (
	CACertFile     = "ca-cert.pem"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
	ClientDir      = "client"
)

// certValidity is how long generated certificates are valid.
const certValidity = 10 * 365 * 24 * time.Hour

// TLSConfig returns the server TLS configuration kept in dir, creating it
// at the first start: a new CA (its key is not kept), a server certificate
// for localhost, this host's name and addresses and the extra hosts, and a
// client certificate with the CA certificate in dir/client. Clients must
// present a certificate from that CA: give them dir/client (libnbd:
// tls-certificates=DIR in an nbds:// URI; qemu: tls-creds-x509 with
// dir=DIR,endpoint=client). Delete dir to issue new ones.
func TLSConfig(dir string, hosts []string) (*tls.Config, error) {
	if _, err := os.Stat(filepath.Join(dir, ServerCertFile)); errors.Is(err, os.ErrNotExist) {
		if err := createCerts(dir, hosts); err != nil {
			return nil, fmt.Errorf("nbd: create TLS certificates in %s: %w", dir, err)
		}
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("nbd: TLS: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("nbd: TLS: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("nbd: TLS: no certificate in %s", filepath.Join(dir, CACertFile))
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// createCerts generates the CA, server and client certificates into dir.
func createCerts(dir string, hosts []string) error {
	if err := os.MkdirAll(filepath.Join(dir, ClientDir), 0o700); err != nil {
		return err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "volumed NBD CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(certValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	if ca, err = x509.ParseCertificate(caDER); err != nil {
		return err
	}
	server := leaf("volumed NBD server", x509.ExtKeyUsageServerAuth, now)
	addSANs(server, hosts)
	client := leaf("volumed NBD client", x509.ExtKeyUsageClientAuth, now)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	for _, p := range []string{filepath.Join(dir, CACertFile), filepath.Join(dir, ClientDir, CACertFile)} {
		if err := os.WriteFile(p, caPEM, 0o644); err != nil {
			return err
		}
	}
	if err := issue(ca, caKey, client, filepath.Join(dir, ClientDir, ClientCertFile), filepath.Join(dir, ClientDir, ClientKeyFile)); err != nil {
		return err
	}
	// The server certificate last: its presence marks a complete directory.
	return issue(ca, caKey, server, filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile))
}

// leaf is the template of a server or client certificate.
func leaf(cn string, usage x509.ExtKeyUsage, now time.Time) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(certValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
}

// addSANs names localhost, this host and its addresses, and hosts.
func addSANs(c *x509.Certificate, hosts []string) {
	names := append([]string{"localhost"}, hosts...)
	if h, err := os.Hostname(); err == nil {
		names = append(names, h)
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				names = append(names, ipn.IP.String())
			}
		}
	}
	names = append(names, "127.0.0.1", "::1")
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			c.IPAddresses = append(c.IPAddresses, ip)
		} else if n != "" {
			c.DNSNames = append(c.DNSNames, n)
		}
	}
}

// issue signs tmpl with the CA and writes the certificate and a new key.
func issue(ca *x509.Certificate, caKey *ecdsa.PrivateKey, tmpl *x509.Certificate, certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// serial is a random certificate serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}
