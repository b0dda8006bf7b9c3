package bus_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/pki"
)

// trustOf is a certificate for loopback issued by the CA in dir.
func trustOf(t *testing.T, dir string) pki.Trust {
	t.Helper()
	ca, err := pki.LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	k, err := pki.NewKeeper(pki.KeeperConfig{Issuer: ca, Name: "member", Hosts: []string{"127.0.0.1", "localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close(context.Background()) })
	return pki.Trust{Certs: k, Roots: ca.Pool()}
}

func busTLS(tr pki.Trust) bus.TLS {
	return bus.TLS{Server: tr.Server(), Routes: tr.Mutual(), Client: tr.Client()}
}

// TestClientTLSRequiredOffLoopback: an embedded server on every address
// refuses a plain client, takes a TLS one, and the daemon's own
// connection works; on loopback a plain client is still taken.
func TestClientTLSRequiredOffLoopback(t *testing.T) {
	tr := trustOf(t, t.TempDir())
	for _, tc := range []struct {
		listen    string
		plainOK   bool
		wantError string
	}{
		{"0.0.0.0:0", false, ""},
		{"127.0.0.1:0", true, ""},
	} {
		t.Run(tc.listen, func(t *testing.T) {
			dir := t.TempDir()
			b := bus.New(bus.Config{Listen: tc.listen, DataDir: dir, TLS: busTLS(tr)})
			if err := b.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			defer b.Close(context.Background())
			_, port, _ := net.SplitHostPort(strings.TrimPrefix(b.ClientURL(), "tls://"))
			creds := nats.UserCredentials(b.CredsFile(bus.RoleOperator))
			nc, err := nats.Connect("nats://127.0.0.1:"+port, creds, nats.NoReconnect())
			if tc.plainOK != (err == nil) {
				t.Fatalf("plain client: %v, want accepted %v", err, tc.plainOK)
			}
			if nc != nil {
				nc.Close()
			}
			nc, err = nats.Connect("tls://127.0.0.1:"+port, creds, nats.Secure(tr.Client()), nats.NoReconnect())
			if err != nil {
				t.Fatalf("TLS client: %v", err)
			}
			if !nc.TLSRequired() && !tc.plainOK {
				t.Fatal("the server does not say TLS is required")
			}
			nc.Close()
		})
	}
	b := bus.New(bus.Config{Listen: "0.0.0.0:0", DataDir: t.TempDir()})
	if err := b.Start(context.Background()); err == nil {
		b.Close(context.Background())
		t.Fatal("an embedded server off loopback started without TLS")
	}
}

// TestRoutesMutualTLS: members off loopback sharing a CA form a cluster
// over mutual TLS; the route port refuses a peer with a certificate of
// another CA, or none.
func TestRoutesMutualTLS(t *testing.T) {
	confs, _ := clusterConfs(t, 2, true)
	for _, conf := range confs {
		// Off loopback, where routes take TLS; the routes still dial 127.0.0.1.
		data, err := os.ReadFile(conf)
		if err != nil {
			t.Fatal(err)
		}
		data = []byte(strings.Replace(string(data), "cluster {\n  name: volumed\n  listen: 127.0.0.1:", "cluster {\n  name: volumed\n  listen: 0.0.0.0:", 1))
		if err := os.WriteFile(conf, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	caDir, credsDir := t.TempDir(), t.TempDir()
	ctx := context.Background()
	buses := make([]*bus.Bus, len(confs))
	errs := make(chan error, len(confs))
	for i, conf := range confs {
		buses[i] = bus.New(bus.Config{ConfigFile: conf, Replicas: 2, CredsDir: credsDir, TLS: busTLS(trustOf(t, caDir))})
		go func() { errs <- buses[i].Start(ctx) }()
	}
	for range confs {
		if err := <-errs; err != nil {
			t.Fatalf("start: %v", err)
		}
	}
	for _, b := range buses {
		defer b.Close(ctx)
	}
	s, err := buses[0].JetStream().Stream(ctx, bus.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(ctx); err != nil || info.Cluster == nil || len(info.Cluster.Replicas) != 1 {
		t.Fatalf("jobs stream %+v %v: want 2 replicas over the TLS routes", info, err)
	}
	routePort := routePortOf(t, confs[0])
	good, foreign := trustOf(t, caDir), trustOf(t, t.TempDir())
	dial := func(cfg *tls.Config) error {
		cfg.ServerName = "127.0.0.1"
		conn, err := net.DialTimeout("tcp", "127.0.0.1:"+routePort, 5*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 4096)
		tc := tls.Client(conn, cfg)
		if err := tc.Handshake(); err != nil {
			return err
		}
		// TLS 1.3: the server's verdict on our certificate comes with
		// its first record, the route INFO.
		n, err := tc.Read(buf)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(string(buf[:n]), "INFO ") {
			return errors.New("no INFO from the route port: " + string(buf[:n]))
		}
		return nil
	}
	if err := dial(good.Mutual()); err != nil {
		t.Fatalf("a member of the CA: %v", err)
	}
	foreignCfg := foreign.Mutual()
	foreignCfg.RootCAs = good.Roots // it knows our CA certificate, not its key
	for name, cfg := range map[string]*tls.Config{"foreign certificate": foreignCfg, "no certificate": good.Client()} {
		if err := dial(cfg); err == nil {
			t.Fatalf("%s: the route port took it", name)
		}
	}
}

// routePortOf reads the cluster listen port of a clusterConfs file.
func routePortOf(t *testing.T, conf string) string {
	t.Helper()
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	_, rest, _ := strings.Cut(string(data), "cluster {")
	_, rest, _ = strings.Cut(rest, "listen: 0.0.0.0:")
	port, _, _ := strings.Cut(rest, "\n")
	if _, err := strconv.Atoi(port); err != nil {
		t.Fatalf("no cluster port in %s", conf)
	}
	return port
}
