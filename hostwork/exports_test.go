package hostwork

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// flipFence holds at the first check and is lost from the second on: a
// writer paused between its check and its write.
type flipFence struct{ checks int }

func (f *flipFence) Check(context.Context) error {
	if f.checks++; f.checks > 1 {
		return engine.ErrLost
	}
	return nil
}

// TestLateExportWriteUndone: an export write whose claim is lost between
// the fence check and the write finds it lost on the check after, takes
// the write back (deletes what it created, puts back what it replaced)
// and asks no host to serve it.
func TestLateExportWriteUndone(t *testing.T) {
	ctx := context.Background()
	store := memstore.New()
	h := New(Config{Store: store, VMID: "vm-1"}) // no Conn: asking a host would panic
	now := time.Now().UTC()
	id := commands.DeviceIdentity{}
	e := commands.Export{VolumeID: "vol-1", VMID: "vm-1", ExportName: "vol-1", DevicePath: "/dev/vdb",
		DeviceIdentity: &id, Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now}

	for _, tc := range []struct {
		name string
		prev *commands.Export
	}{
		{"created", nil},
		{"replaced", &commands.Export{VolumeID: "vol-1", VMID: "vm-1", ExportName: "vol-1", DevicePath: "/dev/vdb",
			DeviceIdentity: &id, ReadOnly: true, Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := store.DeleteExport(ctx, "vol-1", 0); err != nil {
				t.Fatal(err)
			}
			if tc.prev != nil {
				if _, err := store.PutExport(ctx, *tc.prev); err != nil {
					t.Fatal(err)
				}
			}
			if err := h.PutExport(ctx, &flipFence{}, e); !errors.Is(err, engine.ErrLost) {
				t.Fatalf("late export write: %v, want ErrLost", err)
			}
			got, err := store.GetExport(ctx, "vol-1")
			switch {
			case tc.prev == nil && !errors.Is(err, state.ErrNotFound):
				t.Fatalf("late write left its export: %+v (%v)", got, err)
			case tc.prev != nil && (err != nil || !got.ReadOnly):
				t.Fatalf("late write left %+v (%v), want the read-only export back", got, err)
			}
		})
	}
}

// noExporter serves nothing: the test never gets as far as serving.
type noExporter struct{}

func (noExporter) Sync(context.Context, []commands.Export) error { return nil }
func (noExporter) Clients() map[string]int                       { return nil }

// lostFence is the fence of an executor whose operation was taken over.
type lostFence struct{}

func (lostFence) Check(context.Context) error { return engine.ErrLost }

// TestLateAutoExportWritesNothing: an attach that lost its operation
// before auto-exporting records no export (and asks no host).
func TestLateAutoExportWritesNothing(t *testing.T) {
	ctx := context.Background()
	store := memstore.New()
	h := New(Config{Store: store, VMID: "vm-1", Exporter: noExporter{}, AutoExport: true}) // no Conn: asking a host would panic
	id := commands.DeviceIdentity{}
	m := commands.Mapping{VolumeID: "vol-1", VMID: "vm-1", LinuxState: commands.LinuxDetected,
		DevicePath: "/dev/vdb", DeviceIdentity: &id}
	h.AutoExport(ctx, lostFence{}, m)
	if got, err := store.GetExport(ctx, "vol-1"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("late auto-export recorded %+v (%v)", got, err)
	}
}
