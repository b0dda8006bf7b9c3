package state_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/internal/upgrade"
	"github.com/volumed/volumed/state"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestKVFormat: the embedded store records its format at the first start
// and refuses a newer one.
func TestKVFormat(t *testing.T) {
	b := testenv.StartBus(t)
	ctx := context.Background()
	s := newKV(t, b.JetStream(), "format_test")
	if err := state.Upgrade(ctx, s, quietLog); err != nil {
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
	if _, err := kv.Put(ctx, "meta.format", []byte("2")); err != nil {
		t.Fatal(err)
	}
	if err := state.Upgrade(ctx, s, quietLog); !errors.Is(err, upgrade.ErrRefused) {
		t.Fatalf("upgrade of format 2: %v, want ErrRefused", err)
	}
}
