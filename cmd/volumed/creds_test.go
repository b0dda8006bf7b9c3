package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
)

// TestCredsAgent mints an agent's credentials before and while the
// embedded server runs on the same data dir: both are let in, as that VM.
func TestCredsAgent(t *testing.T) {
	dir := t.TempDir()
	const vm = "2b7e6c1d-5f4a-4e3b-9c8d-7a6b5c4d3e2f"
	var out bytes.Buffer
	if code := run([]string{"creds", "agent", "--vm-id", "VM-" + strings.ToUpper(vm), "--data-dir", dir}, &out); code != 0 {
		t.Fatalf("creds agent: exit %d: %s", code, out.String())
	}
	before := bus.AgentCredsFile(filepath.Join(dir, "creds"), vm)
	if fi, err := os.Stat(before); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("agent credentials %s: %v %v, want mode 0600", before, fi, err)
	}
	b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
	if err := b.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer b.Close(context.Background())
	during := filepath.Join(t.TempDir(), "agent.creds")
	if err := os.WriteFile(during, []byte("old contents"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code := run([]string{"creds", "agent", "--vm-id", vm, "--data-dir", dir, "--out", during}, &out); code != 0 {
		t.Fatalf("creds agent --out: exit %d: %s", code, out.String())
	}
	if fi, _ := os.Stat(during); fi.Mode().Perm() != 0o600 {
		t.Fatalf("rewritten credentials have mode %v, want 0600", fi.Mode().Perm())
	}
	for _, creds := range []string{before, during} {
		nc, err := nats.Connect(b.ClientURL(), nats.UserCredentials(creds), nats.CustomInboxPrefix(bus.AgentInboxPrefix(vm)))
		if err != nil {
			t.Fatalf("connect with %s: %v", creds, err)
		}
		// Its own VM's events are stored; another VM's are refused.
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(context.Background(), "devices."+vm+".add", []byte(`{}`)); err != nil {
			t.Fatalf("own device event: %v", err)
		}
		errs := make(chan error, 1)
		nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { errs <- err })
		if err := nc.Publish("devices.other-vm.add", nil); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-errs:
			if !strings.Contains(err.Error(), "devices.other-vm.add") {
				t.Fatalf("violation %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("publishing another VM's subject raised no permission violation")
		}
		nc.Close()
	}
}

func TestCredsServerConfig(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(t.TempDir(), "auth.conf")
	var out bytes.Buffer
	if code := run([]string{"creds", "server-config", "--data-dir", dir, "--out", conf}, &out); code != 0 {
		t.Fatalf("creds server-config: exit %d: %s", code, out.String())
	}
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"operator: ey", "system_account: A", "resolver: MEMORY", "resolver_preload"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("server config lacks %q:\n%s", want, data)
		}
	}
	// The daemon on that server takes --nats-creds and
	// --nats-service-creds from the data dir.
	for _, role := range []string{bus.RoleDaemon, bus.RoleService} {
		if _, err := os.Stat(bus.CredsFile(credsDir(dir), role)); err != nil {
			t.Errorf("%s credentials not written: %v", role, err)
		}
	}
}
