package kinds_test

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/hostwork"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/stores/memstore"
)

// servedSet is an Exporter that serves every record it is given.
type servedSet struct {
	mu    sync.Mutex
	names map[string]int
}

func (x *servedSet) Sync(_ context.Context, exports []commands.Export) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.names = map[string]int{}
	for _, e := range exports {
		x.names[e.ExportName] = 0
	}
	return nil
}

func (x *servedSet) Clients() map[string]int {
	x.mu.Lock()
	defer x.mu.Unlock()
	out := map[string]int{}
	for n, c := range x.names {
		out[n] = c
	}
	return out
}

// TestExportKinds: an export of a volume whose device was found records
// its export and has this host serve it; one without a found device is a
// CONFLICT; an unexport ends it, and an unexport of none completes.
func TestExportKinds(t *testing.T) {
	const vm = "vm-here"
	ctx := context.Background()
	store := memstore.New()
	served := &servedSet{}
	log := slog.New(slog.DiscardHandler)
	host := hostwork.New(hostwork.Config{Store: store, VMID: vm, Exporter: served, Logger: log})
	writer := engine.NewMappingWriter(store, nil, log)
	e := engine.New(engine.Config{Operations: store, Publisher: nopEvents{}, Logger: log,
		Timing: engine.Timing{StepTimeout: time.Second, SettleTimeout: time.Millisecond, Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}},
		kinds.All(kinds.Deps{Operations: store, Mappings: writer, Exports: host, Log: log,
			Release: &engine.Releaser{Mappings: writer, Exports: host, Log: log}})...)
	now := time.Now().UTC()
	for vol, state := range map[string]string{"vol-found": commands.LinuxDetected, "vol-missing": commands.LinuxMissing} {
		m := commands.Mapping{ID: "mapping-" + vol, VolumeID: vol, VMID: vm, DevicePath: "/dev/vdb", LinuxState: state,
			CloudStackState: commands.CloudStackAttached, DeviceIdentity: &commands.DeviceIdentity{Name: "vdb", Major: 253, Minor: 16},
			LastSync: now, CreatedAt: now, UpdatedAt: now}
		if vol == "vol-missing" {
			m.DevicePath = ""
		}
		if _, err := store.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	run := func(typ commands.OpType, req any) commands.Operation {
		t.Helper()
		w := &world{t: t, store: store, engine: e}
		id := w.resumed(typ, "", nil, req, "", "")
		return w.run(id)
	}
	op := run(commands.OpExport, commands.ExportRequest{VolumeID: "vol-found", ReadOnly: true})
	rec, err := store.GetExport(ctx, "vol-found")
	if op.Status != commands.StatusCompleted || err != nil || !rec.ReadOnly || served.Clients()[rec.ExportName] != 0 || len(served.Clients()) != 1 {
		t.Fatalf("export: %s %s; record %+v (%v); served %v", op.Status, op.Error, rec, err, served.Clients())
	}
	if op := run(commands.OpExport, commands.ExportRequest{VolumeID: "vol-missing"}); op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeConflict {
		t.Fatalf("export of a volume without its device: %s %v, want CONFLICT", op.Status, op.Details)
	}
	op = run(commands.OpUnexport, commands.VolumeRequest{VolumeID: "vol-found"})
	if _, err := store.GetExport(ctx, "vol-found"); op.Status != commands.StatusCompleted || err == nil || len(served.Clients()) != 0 {
		t.Fatalf("unexport: %s %s; record left: %v; served %v", op.Status, op.Error, err == nil, served.Clients())
	}
	if op := run(commands.OpUnexport, commands.VolumeRequest{VolumeID: "vol-found"}); op.Response == nil || op.Response.Message != "Volume was not exported" {
		t.Fatalf("unexport of none: %+v", op)
	}
}
