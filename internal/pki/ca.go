// Package pki is volumed's public key infrastructure: its own certificate
// authority in <data-dir>/tls, made at first start, the short-lived
// certificates it issues and renews, the user's certificates reloaded
// when they change, and the tls.Configs that always present the current
// certificate, so a renewal never cuts a connection.
package pki

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
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/volumed/volumed/bus"
)

// Layout of the TLS directory (<data-dir>/tls).
const (
	// DirName is the TLS directory's name in the data dir.
	DirName = "tls"
	// CAFile is the CA certificate: give it to clients (volctl --cacert,
	// nats --tlsca, an agent's --nats-ca) and copy it, with CAKeyFile, to
	// the other members of a cluster.
	CAFile = "ca.pem"
	// CAKeyFile is the CA's private key (0600).
	CAKeyFile = "ca-key.pem"
)

// Lifetimes.
const (
	// caValidity is how long a CA volumed makes is valid.
	caValidity = 10 * 365 * 24 * time.Hour
	// DefaultLifetime is how long a certificate volumed issues is valid;
	// it is renewed at two thirds of it.
	DefaultLifetime = 30 * 24 * time.Hour
	// maxBackdate bounds how far before its issue a certificate is valid
	// from, for clocks a little behind.
	maxBackdate = 5 * time.Minute
)

// CA is volumed's certificate authority.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

// LoadCA reads the CA in dir (CAFile, CAKeyFile), making both at the first
// start; two processes starting at once end with the same CA.
func LoadCA(dir string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	certPath, keyPath := filepath.Join(dir, CAFile), filepath.Join(dir, CAKeyFile)
	if _, err := os.Stat(certPath); errors.Is(err, fs.ErrNotExist) {
		if err := lockedCreate(dir, certPath, keyPath); err != nil {
			return nil, fmt.Errorf("pki: create CA in %s: %w", dir, err)
		}
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("pki: CA: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: CA in %s: %w", dir, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("pki: CA key %s: want an ECDSA key", keyPath)
	}
	if !pair.Leaf.IsCA {
		return nil, fmt.Errorf("pki: %s is not a CA certificate", certPath)
	}
	return &CA{cert: pair.Leaf, key: key, pem: certPEM}, nil
}

// lockedCreate makes the CA unless another process, holding the lock on
// dir first, made it.
func lockedCreate(dir, certPath, keyPath string) error {
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	if _, err := os.Stat(certPath); err == nil {
		return nil
	}
	return createCA(certPath, keyPath)
}

// createCA makes a new CA: the key first, the certificate last, whose
// presence marks a complete CA.
func createCA(certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	host, _ := os.Hostname()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "volumed CA " + host, Organization: []string{"volumed"}},
		NotBefore:             now.Add(-maxBackdate),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return err
	}
	if err := bus.WriteSecret(keyPath, keyPEM, false); err != nil {
		return err
	}
	return writePublic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), true)
}

// CertPEM is the CA certificate, PEM encoded.
func (c *CA) CertPEM() []byte { return c.pem }

// Pool is a pool holding the CA certificate alone.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.cert)
	return p
}

// Issue signs a new key's certificate named name for hosts (DNS names or
// IP addresses), valid for lifetime, usable by a server and a client.
func (c *CA) Issue(name string, hosts []string, lifetime time.Duration) (tls.Certificate, error) {
	if lifetime <= 0 {
		return tls.Certificate{}, fmt.Errorf("pki: issue %s: lifetime %v", name, lifetime)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, Organization: []string{"volumed"}},
		NotBefore:    now.Add(-min(maxBackdate, lifetime/10)),
		NotAfter:     now.Add(lifetime),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: issue %s: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("pki: issue %s: %w", name, err)
	}
	return tls.Certificate{Certificate: [][]byte{der, c.cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// LocalHosts are the names a certificate of this host carries: localhost,
// the host name, every address of its interfaces, and extra.
func LocalHosts(extra ...string) []string {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	if h, err := os.Hostname(); err == nil {
		hosts = append(hosts, h)
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				hosts = append(hosts, ipn.IP.String())
			}
		}
	}
	seen := map[string]bool{}
	var out []string
	for _, h := range append(hosts, extra...) {
		if h != "" && !seen[h] && h != "0.0.0.0" && h != "::" {
			seen[h] = true
			out = append(out, h)
		}
	}
	return out
}

// encodeKey is a private key in PEM (PKCS #8).
func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// EncodePair is a certificate's chain and key in PEM.
func EncodePair(c tls.Certificate) (certPEM, keyPEM []byte, err error) {
	for _, der := range c.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, ok := c.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("pki: want an ECDSA key")
	}
	keyPEM, err = encodeKey(key)
	return certPEM, keyPEM, err
}

// writePublic writes a certificate atomically, readable by all (0644).
func writePublic(path string, data []byte, exclusive bool) error {
	if err := bus.WriteSecret(path, data, exclusive); err != nil {
		return err
	}
	return os.Chmod(path, 0o644)
}

// serial is a random certificate serial number.
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}
