package bus_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/internal/testenv"
)

func TestStartCreatesStreamsIdempotently(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	for round := 0; round < 2; round++ {
		b := bus.New(bus.Config{Listen: "127.0.0.1:0", DataDir: dir})
		if err := b.Start(ctx); err != nil {
			t.Fatalf("round %d: start: %v", round, err)
		}
		for _, name := range []string{bus.StreamJobs, bus.StreamOps, bus.StreamDevices} {
			s, err := b.JetStream().Stream(ctx, name)
			if err != nil {
				t.Fatalf("round %d: stream %s: %v", round, name, err)
			}
			if name == bus.StreamJobs && s.CachedInfo().Config.Retention != jetstream.WorkQueuePolicy {
				t.Errorf("jobs stream retention = %v, want work queue", s.CachedInfo().Config.Retention)
			}
		}
		if round == 0 {
			if _, err := b.JetStream().Publish(ctx, "volumes.ops.op-1", []byte(`{}`)); err != nil {
				t.Fatalf("publish: %v", err)
			}
		} else {
			s, _ := b.JetStream().Stream(ctx, bus.StreamOps)
			info, err := s.Info(ctx)
			if err != nil || info.State.Msgs != 1 {
				t.Fatalf("ops stream after restart: msgs=%v err=%v, want the 1 message kept on file", info, err)
			}
		}
		if err := b.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if err := b.Close(ctx); err != nil {
			t.Fatalf("second close: %v", err)
		}
	}
}

func TestConfigFile(t *testing.T) {
	port := testenv.FreePort(t)
	conf := filepath.Join(t.TempDir(), "nats.conf")
	store := t.TempDir()
	body := "listen: 127.0.0.1:" + strconv.Itoa(port) + "\njetstream { store_dir: \"" + store + "\" }\n"
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	b := bus.New(bus.Config{ConfigFile: conf, DataDir: t.TempDir()})
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("start: %v", err)
	}
	defer b.Close(context.Background())
	if want := "nats://127.0.0.1:" + strconv.Itoa(port); b.ClientURL() != want {
		t.Errorf("client URL %s, want %s", b.ClientURL(), want)
	}
	if entries, _ := os.ReadDir(store); len(entries) == 0 {
		t.Errorf("store_dir %s from the config file is empty", store)
	}
	// A second Bus connects to the first one as an external server.
	ext := bus.New(bus.Config{URL: b.ClientURL(), Creds: b.CredsFile(bus.RoleDaemon)})
	if err := ext.Start(context.Background()); err != nil {
		t.Fatalf("external start: %v", err)
	}
	defer ext.Close(context.Background())
	if ext.Embedded() || !b.Embedded() {
		t.Error("Embedded() wrong")
	}
}

func TestBadConfigFile(t *testing.T) {
	conf := filepath.Join(t.TempDir(), "nats.conf")
	if err := os.WriteFile(conf, []byte("listen: {{{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := bus.New(bus.Config{ConfigFile: conf}).Start(context.Background()); err == nil {
		t.Fatal("start with a malformed config file succeeded")
	}
}
