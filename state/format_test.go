package state_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/upgrade"
	"github.com/volumed/volumed/state"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestKVFormat: the embedded store records its format at the first start
// and refuses a newer one, or one that is not a number, before it reads
// anything: its bucket and its index cache are left as they were (no
// cache written at Close, no seal).
func TestKVFormat(t *testing.T) {
	b := testenv.StartBus(t)
	ctx := context.Background()
	cache := filepath.Join(t.TempDir(), "index.cache")
	cfg := state.KVConfig{Bucket: "format_test", IndexCache: cache, Logger: quietLog}
	s, err := state.NewKV(ctx, b.JetStream(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := state.Upgrade(ctx, s, quietLog); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateOperation(ctx, commands.Operation{ID: "op-1", Type: commands.OpCreate, Status: commands.StatusPending}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	kv, err := b.JetStream().KeyValue(ctx, "format_test")
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(ctx, "meta.format")
	if err != nil || string(e.Value()) != "1" {
		t.Fatalf("recorded format %v (%v), want 1", e, err)
	}
	for _, format := range []string{"2", "x"} {
		if _, err := kv.Put(ctx, "meta.format", []byte(format)); err != nil {
			t.Fatal(err)
		}
		before, err := os.ReadFile(cache)
		if err != nil {
			t.Fatalf("no index cache written by the first store: %v", err)
		}
		status, err := kv.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// As volumed starts it.
		s, err := state.NewKV(ctx, b.JetStream(), cfg)
		if err == nil {
			err = state.Upgrade(ctx, s, quietLog)
			_ = s.Close(ctx)
		}
		if !errors.Is(err, upgrade.ErrRefused) {
			t.Fatalf("store of format %q: %v, want ErrRefused", format, err)
		}
		if after, err := os.ReadFile(cache); err != nil || !bytes.Equal(after, before) {
			t.Errorf("format %q: the index cache changed (%v)", format, err)
		}
		if now, err := kv.Status(ctx); err != nil || now.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq !=
			status.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq {
			t.Errorf("format %q: the bucket was written (%v)", format, err)
		}
	}
}
