package pki_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/pki"
	"github.com/volumed/volumed/internal/testenv"
)

func TestLoadCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	var wg sync.WaitGroup
	cas := make([]*pki.CA, 4)
	errs := make([]error, 4)
	for i := range cas {
		wg.Add(1)
		go func() { defer wg.Done(); cas[i], errs[i] = pki.LoadCA(dir) }()
	}
	wg.Wait()
	for i := range cas {
		if errs[i] != nil {
			t.Fatalf("LoadCA %d: %v", i, errs[i])
		}
		if string(cas[i].CertPEM()) != string(cas[0].CertPEM()) {
			t.Fatal("concurrent first starts made two CAs")
		}
	}
	fi, err := os.Stat(filepath.Join(dir, pki.CAKeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("CA key: %v %v, want mode 0600", fi, err)
	}
	again, err := pki.LoadCA(dir)
	if err != nil || string(again.CertPEM()) != string(cas[0].CertPEM()) {
		t.Fatalf("a restart must load the same CA: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, pki.CAKeyFile), []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := pki.LoadCA(dir); err == nil {
		t.Fatal("a broken CA key was accepted")
	}
}

// serve runs a TLS echo server with cfg; it answers each line.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

// roundTrip dials addr with cfg and echoes one message.
func roundTrip(addr string, cfg *tls.Config) (*tls.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	if err := echo(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func echo(c *tls.Conn) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	_, err := io.ReadFull(c, buf)
	return err
}

func startKeeper(t *testing.T, cfg pki.KeeperConfig) *pki.Keeper {
	t.Helper()
	k, err := pki.NewKeeper(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close(context.Background()) })
	return k
}

// TestRenewal: a certificate of 3 s is renewed at 2 s; new handshakes get
// the new one and a connection opened before goes on.
func TestRenewal(t *testing.T) {
	ca, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	k := startKeeper(t, pki.KeeperConfig{Issuer: ca, Name: "server", Hosts: []string{"127.0.0.1"}, Lifetime: 3 * time.Second})
	trust := pki.Trust{Certs: k, Roots: ca.Pool()}
	addr := serve(t, trust.Server())
	first := k.Current()
	long, err := roundTrip(addr, trust.Client())
	if err != nil {
		t.Fatal(err)
	}
	defer long.Close()
	serials := map[string]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for len(serials) < 3 && time.Now().Before(deadline) {
		c, err := roundTrip(addr, trust.Client())
		if err != nil {
			t.Fatalf("handshake across renewals: %v", err)
		}
		serials[c.ConnectionState().PeerCertificates[0].SerialNumber.String()] = true
		c.Close()
		if err := echo(long); err != nil {
			t.Fatalf("the connection opened before a renewal was cut: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(serials) < 3 || k.Current() == first {
		t.Fatalf("saw %d certificates in 15 s of a 3 s lifetime, want renewals", len(serials))
	}
}

// TestMutualRefusesForeign: a member with a certificate of another CA
// cannot connect, nor one without a certificate.
func TestMutualRefusesForeign(t *testing.T) {
	ours, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	hosts := []string{"127.0.0.1"}
	member := pki.Trust{Certs: startKeeper(t, pki.KeeperConfig{Issuer: ours, Name: "a", Hosts: hosts}), Roots: ours.Pool()}
	addr := serve(t, member.Mutual())
	peer := pki.Trust{Certs: startKeeper(t, pki.KeeperConfig{Issuer: ours, Name: "b", Hosts: hosts}), Roots: ours.Pool()}
	c, err := roundTrip(addr, peer.Mutual())
	if err != nil {
		t.Fatalf("a member of the same CA: %v", err)
	}
	c.Close()
	// The intruder trusts our CA (it has the CA certificate, not its key).
	intruder := pki.Trust{Certs: startKeeper(t, pki.KeeperConfig{Issuer: foreign, Name: "x", Hosts: hosts}), Roots: ours.Pool()}
	for name, cfg := range map[string]*tls.Config{"foreign certificate": intruder.Mutual(), "no certificate": peer.Client()} {
		if c, err := roundTrip(addr, cfg); err == nil {
			c.Close()
			t.Fatalf("%s: connected", name)
		}
	}
}

// TestUserFiles: the user's certificate is reloaded when its files change
// and on Reload; a broken pair keeps the current one.
func TestUserFiles(t *testing.T) {
	ca, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	write := func(name string) {
		c, err := ca.Issue(name, []string{"127.0.0.1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		certPEM, keyPEM, err := pki.EncodePair(c)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("one")
	k := startKeeper(t, pki.KeeperConfig{CertFile: certFile, KeyFile: keyFile, PollInterval: 20 * time.Millisecond})
	trust := pki.Trust{Certs: k, Roots: ca.Pool()}
	addr := serve(t, trust.Server())
	name := func() string {
		c, err := roundTrip(addr, trust.Client())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	if n := name(); n != "one" {
		t.Fatalf("serves %q, want one", n)
	}
	write("two")
	testenv.Eventually(t, 10*time.Second, func() bool { return name() == "two" }, "the changed files served")
	if err := os.WriteFile(keyFile, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := k.Reload(); err == nil {
		t.Fatal("Reload of a broken key succeeded")
	}
	if n := name(); n != "two" {
		t.Fatalf("after a broken reload serves %q, want the last good one", n)
	}
	write("three")
	if err := k.Reload(); err != nil {
		t.Fatal(err)
	}
	if n := name(); n != "three" {
		t.Fatalf("after Reload serves %q", n)
	}
}

func TestNewKeeperValidates(t *testing.T) {
	ca, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]pki.KeeperConfig{
		"nothing":   {},
		"cert only": {CertFile: "c.pem"},
		"both":      {Issuer: ca, CertFile: "c.pem", KeyFile: "k.pem"},
	} {
		if _, err := pki.NewKeeper(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	_, err = pki.NewKeeper(pki.KeeperConfig{CertFile: "/nonexistent", KeyFile: "/nonexistent"})
	if err != nil {
		t.Fatal(err)
	}
	k, _ := pki.NewKeeper(pki.KeeperConfig{CertFile: "/nonexistent", KeyFile: "/nonexistent"})
	if err := k.Start(context.Background()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Start with missing files: %v", err)
	}
}
