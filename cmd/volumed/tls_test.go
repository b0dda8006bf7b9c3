package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/pki"
	"github.com/volumed/volumed/nbd"
)

// TestTLSConfigErrors: the TLS flags' configuration errors exit 2 and
// name the flag.
func TestTLSConfigErrors(t *testing.T) {
	badTokens := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(badTokens, []byte("alice\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"plain HTTP off loopback", cs("--listen", "0.0.0.0:8090", "--api-tls", "off"), "plain HTTP is refused off loopback"},
		{"bad api-tls", cs("--api-tls", "maybe"), "--api-tls"},
		{"cert without key", cs("--tls-cert", "c.pem", "--tls-ca", "ca.pem"), "go together"},
		{"cert without CA", cs("--tls-cert", "c.pem", "--tls-key", "k.pem"), "go together"},
		{"lifetime too short", cs("--tls-lifetime", "10ms"), "--tls-lifetime"},
		{"bad tokens file", cs("--api-tokens-file", badTokens), "--api-tokens-file"},
		{"missing tokens file", cs("--api-tokens-file", "/nonexistent/tokens"), "--api-tokens-file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			if code := run(tc.args, &out); code != 2 || !strings.Contains(out.String(), tc.want) {
				t.Fatalf("exit %d, want 2; output lacks %q:\n%s", code, tc.want, out.String())
			}
		})
	}
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// startTestSecurity starts the daemon's security on a data dir.
func startTestSecurity(t *testing.T, cfg config) *security {
	t.Helper()
	sec, more, err := startSecurity(context.Background(), cfg, quiet())
	for _, c := range more {
		t.Cleanup(func() { _ = c.Close(context.Background()) })
	}
	if err != nil {
		t.Fatal(err)
	}
	return sec
}

// nbdHandshake runs a TLS handshake between the NBD server config and a
// client with the files of dir (ca-cert.pem, client-cert.pem, client-key.pem).
func nbdHandshake(t *testing.T, server *tls.Config, dir string) error {
	t.Helper()
	caPEM, err := os.ReadFile(filepath.Join(dir, nbd.CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, nbd.ClientCertFile), filepath.Join(dir, nbd.ClientKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", server)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			_ = c.(*tls.Conn).Handshake()
			_, _ = c.Write([]byte("x"))
			c.Close()
		}
	}()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(),
		&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: "127.0.0.1"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Read(make([]byte, 1))
	return err
}

// TestNBDCertificates: a new data dir gets NBD client files of volumed's
// CA that the NBD server takes; a data dir of an earlier version keeps its
// nbd-tls/ certificates, so its clients keep working.
func TestNBDCertificates(t *testing.T) {
	t.Run("new", func(t *testing.T) {
		cfg := config{dataDir: t.TempDir(), listen: "127.0.0.1:8090", nbdListen: "127.0.0.1:10809"}
		cfg.tls.lifetime = time.Hour
		sec := startTestSecurity(t, cfg)
		server, more, err := sec.nbdTLS(context.Background(), cfg, quiet())
		for _, c := range more {
			defer c.Close(context.Background())
		}
		if err != nil {
			t.Fatal(err)
		}
		dir := filepath.Join(cfg.dataDir, pki.DirName, nbdClientDir)
		if fi, err := os.Stat(filepath.Join(dir, nbd.ClientKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("client key: %v %v, want 0600", fi, err)
		}
		if err := nbdHandshake(t, server, dir); err != nil {
			t.Fatalf("NBD client with the files of volumed's CA: %v", err)
		}
	})
	t.Run("earlier version", func(t *testing.T) {
		cfg := config{dataDir: t.TempDir(), listen: "127.0.0.1:8090"}
		cfg.tls.lifetime = time.Hour
		legacy := filepath.Join(cfg.dataDir, legacyNBDDir)
		if _, err := nbd.TLSConfig(legacy, nil); err != nil { // what an earlier version made
			t.Fatal(err)
		}
		sec := startTestSecurity(t, cfg)
		server, _, err := sec.nbdTLS(context.Background(), cfg, quiet())
		if err != nil {
			t.Fatal(err)
		}
		if err := nbdHandshake(t, server, filepath.Join(legacy, nbd.ClientDir)); err != nil {
			t.Fatalf("a client of the earlier certificates: %v", err)
		}
	})
}

// TestUserCertificates: --tls-cert, --tls-key and --tls-ca replace
// volumed's CA; a SIGHUP's reload takes new files and the tokens file.
func TestUserCertificates(t *testing.T) {
	ca, err := pki.LoadCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string) {
		c, err := ca.Issue(name, []string{"127.0.0.1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		certPEM, keyPEM, _ := pki.EncodePair(c)
		_ = os.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600)
		_ = os.WriteFile(filepath.Join(dir, "cert.pem"), certPEM, 0o644)
	}
	write("first")
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokens, []byte("alice:"+strings.Repeat("a", 20)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := config{dataDir: t.TempDir(), listen: "0.0.0.0:8090"}
	cfg.tls = tlsFlags{cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem"), ca: caFile,
		apiTLS: "auto", tokensFile: tokens}
	sec := startTestSecurity(t, cfg)
	if sec.ca != nil {
		t.Fatal("volumed's CA made with the user's certificates")
	}
	if _, err := os.Stat(filepath.Join(cfg.dataDir, pki.DirName, pki.CAFile)); err == nil {
		t.Fatal("volumed's CA written with the user's certificates")
	}
	if sec.apiTLS(cfg) == nil {
		t.Fatal("plain HTTP off loopback")
	}
	if n := sec.keeper.Current().Leaf.Subject.CommonName; n != "first" {
		t.Fatalf("serves %q", n)
	}
	write("second")
	if err := os.WriteFile(tokens, []byte("bob:"+strings.Repeat("b", 20)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := sec.reload(cfg); err != nil {
		t.Fatal(err)
	}
	if n := sec.keeper.Current().Leaf.Subject.CommonName; n != "second" {
		t.Fatalf("after reload serves %q", n)
	}
	if _, ok := sec.tokens.Lookup(strings.Repeat("a", 20)); ok {
		t.Fatal("a token removed from the file still works")
	}
	if name, ok := sec.tokens.Lookup(strings.Repeat("b", 20)); !ok || name != "bob" {
		t.Fatal("a token added to the file does not work")
	}
}

// TestServerConfigTLS: `volumed creds server-config` makes an external
// nats-server require TLS with a certificate of volumed's CA, which a
// volumed of the same data dir trusts on --nats-url and a client without
// the CA does not.
func TestServerConfigTLS(t *testing.T) {
	dir := t.TempDir()
	var out bytes.Buffer
	conf := filepath.Join(t.TempDir(), "volumed-auth.conf")
	if code := run([]string{"creds", "server-config", "--data-dir", dir, "--tls-host", "127.0.0.1", "--out", conf}, &out); code != 0 {
		t.Fatalf("creds server-config: exit %d: %s", code, out.String())
	}
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, pki.DirName, "nats-server-key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("server key: %v %v", fi, err)
	}
	full := filepath.Join(t.TempDir(), "nats-server.conf")
	if err := os.WriteFile(full, append(data, []byte(fmt.Sprintf("\nlisten: 127.0.0.1:-1\njetstream { store_dir: %q }\n", t.TempDir()))...), 0o600); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(full)
	if err != nil {
		t.Fatalf("nats-server takes the configuration: %v\n%s", err, data)
	}
	opts.NoLog, opts.NoSigs = true, true
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	defer srv.Shutdown()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	url := strings.Replace(srv.ClientURL(), "nats://", "tls://", 1)

	auth, err := bus.LoadAuthority(filepath.Join(dir, "creds"))
	if err != nil {
		t.Fatal(err)
	}
	if err := auth.WriteRoleCreds(); err != nil {
		t.Fatal(err)
	}
	cfg := config{dataDir: dir, listen: "127.0.0.1:8090", natsURL: url}
	cfg.tls.lifetime = time.Hour
	sec := startTestSecurity(t, cfg)
	busTLS, err := sec.busTLS(cfg)
	if err != nil {
		t.Fatal(err)
	}
	b := bus.New(bus.Config{URL: url, Creds: bus.CredsFile(filepath.Join(dir, "creds"), bus.RoleDaemon), DataDir: dir,
		TLS: busTLS, Logger: quiet()})
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("volumed on the external server over TLS: %v", err)
	}
	defer b.Close(context.Background())
	if _, err := nats.Connect(url, nats.UserCredentials(bus.CredsFile(filepath.Join(dir, "creds"), bus.RoleOperator)),
		nats.NoReconnect()); err == nil {
		t.Fatal("a client without volumed's CA trusted the external server")
	}
}
