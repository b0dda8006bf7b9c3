package kinds_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// gatedCloud is a CloudStack whose job waits block until the test opens
// the gate: an executor paused while it polls a job (SIGSTOP). Only the
// calls attach and detach make are answered.
type gatedCloud struct {
	csapi.API
	mu      sync.Mutex
	vol     csapi.Volume
	polling chan struct{} // closed when a job wait starts
	gate    chan struct{} // closed by the test: the job wait returns
	once    sync.Once
}

func newGatedCloud(vol csapi.Volume) *gatedCloud {
	return &gatedCloud{vol: vol, polling: make(chan struct{}), gate: make(chan struct{})}
}

func (c *gatedCloud) set(vmID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.vol.VMID = vmID
	if vmID == "" {
		c.vol.DeviceID = nil
	} else {
		dev := int64(1)
		c.vol.DeviceID = &dev
	}
}

func (c *gatedCloud) GetVolume(context.Context, string) (csapi.Volume, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.vol, nil
}

func (c *gatedCloud) AttachVolume(_ context.Context, _, vmID string, _ *int64) (string, error) {
	return "job-attach", nil
}

func (c *gatedCloud) DetachVolume(context.Context, string) (string, error) { return "job-detach", nil }

func (c *gatedCloud) WaitJob(ctx context.Context, jobID string) (csapi.Job, error) {
	c.once.Do(func() { close(c.polling) })
	select {
	case <-c.gate:
	case <-ctx.Done():
		return csapi.Job{}, ctx.Err()
	}
	vol, _ := c.GetVolume(ctx, "")
	return csapi.Job{ID: jobID, Status: csapi.JobSuccess, Volume: &vol}, nil
}

// recordingDevices is a device agent side that records the releases it
// is asked for (a persistent name removed).
type recordingDevices struct {
	agent    bool
	mu       sync.Mutex
	released []string
}

func (d *recordingDevices) HasAgent(context.Context, string) bool { return d.agent }

func (d *recordingDevices) Attached(_ context.Context, want commands.Mapping, _ time.Time) (commands.Mapping, error) {
	want.LinuxState, want.DevicePath = commands.LinuxDetected, "/dev/vdb"
	return want, nil
}

func (d *recordingDevices) Detached(_ context.Context, m commands.Mapping) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.released = append(d.released, m.VolumeID)
	return nil
}

// storeExports is host work on the store's export records alone.
type storeExports struct{ store state.Exports }

func (x storeExports) HasExport(ctx context.Context, volumeID string) (bool, error) {
	_, err := x.store.GetExport(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

func (x storeExports) DropExport(ctx context.Context, f engine.Fence, volumeID string) (string, error) {
	e, err := x.store.GetExport(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if f != nil {
		if err := f.Check(ctx); err != nil {
			return "", err
		}
	}
	return e.ExportName, x.store.DeleteExport(ctx, volumeID, e.Revision)
}

func (x storeExports) ExportFor(context.Context, string) (commands.Export, error) {
	return commands.Export{}, errors.New("not in this test")
}

func (x storeExports) PutExport(context.Context, engine.Fence, commands.Export) error {
	return errors.New("not in this test")
}

func (x storeExports) AutoExport(context.Context, engine.Fence, commands.Mapping) {}

func (x storeExports) Record(ctx context.Context, volumeID string) (commands.Export, error) {
	return x.store.GetExport(ctx, volumeID)
}

func (x storeExports) Ping(context.Context, string) error { return errors.New("not in this test") }

func (x storeExports) Serving() bool { return false }

func (x storeExports) VMID() string { return "" }

// lockedBuffer is a log sink safe for concurrent writers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type nopEvents struct{}

func (nopEvents) PublishOperation(context.Context, commands.Operation) {}

// fenceWorld is one store, one CloudStack and the kinds, run by an engine
// as executor B; the test plays executor A on the same store.
type fenceWorld struct {
	store   *memstore.Store
	cloud   *gatedCloud
	devices *recordingDevices
	writer  *engine.MappingWriter
	engine  *engine.Engine
	log     *lockedBuffer
}

func newFenceWorld(t *testing.T, vmID string, agent bool) *fenceWorld {
	t.Helper()
	w := &fenceWorld{store: memstore.New(), devices: &recordingDevices{agent: agent}, log: &lockedBuffer{}}
	w.cloud = newGatedCloud(csapi.Volume{ID: "vol-1", Size: 1 << 30})
	w.cloud.set(vmID)
	log := slog.New(slog.NewTextHandler(w.log, nil))
	w.writer = engine.NewMappingWriter(w.store, nil, log)
	exports := storeExports{w.store}
	rel := &engine.Releaser{Mappings: w.writer, Exports: exports, Devices: w.devices, Log: log}
	w.engine = engine.New(engine.Config{Operations: w.store, Publisher: nopEvents{}, Logger: log,
		Timing: engine.Timing{StepTimeout: time.Minute, SettleTimeout: time.Second, Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}},
		kinds.All(kinds.Deps{CloudStack: w.cloud, Operations: w.store, Mappings: w.writer, Release: rel,
			Devices: w.devices, Exports: exports, Log: log})...)
	return w
}

// accepted records a pending operation.
func (w *fenceWorld) accepted(t *testing.T, id string, typ commands.OpType, req any) {
	t.Helper()
	raw, _ := json.Marshal(req)
	now := time.Now().UTC()
	if _, err := w.store.CreateOperation(context.Background(), commands.Operation{ID: id, Type: typ, Status: commands.StatusPending,
		VolumeID: "vol-1", Request: raw, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
}

// runB runs the operation as executor B in the background; its result
// arrives on the channel.
func (w *fenceWorld) runB(id string) <-chan engine.Result {
	done := make(chan engine.Result, 1)
	go func() {
		done <- w.engine.Run(context.Background(), id, slog.New(slog.NewTextHandler(w.log, nil)).With("executor", "B"))
	}()
	return done
}

// takeOver is executor A: it claims the operation as the next attempt
// and completes it.
func (w *fenceWorld) takeOver(t *testing.T, id string) {
	t.Helper()
	ctx := context.Background()
	op, err := w.store.GetOperation(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	op.Attempts++
	op.UpdatedAt = time.Now().UTC()
	if op, err = w.store.UpdateOperation(ctx, op); err != nil {
		t.Fatalf("claim by A: %v", err)
	}
	now := time.Now().UTC()
	op.Status, op.CompletedAt = commands.StatusCompleted, &now
	if _, err := w.store.UpdateOperation(ctx, op); err != nil {
		t.Fatalf("end by A: %v", err)
	}
}

// mapped records the mapping a completed attach leaves.
func (w *fenceWorld) mapped(t *testing.T, id string) commands.Mapping {
	t.Helper()
	now := time.Now().UTC()
	m, err := w.store.PutMapping(context.Background(), commands.Mapping{ID: id, VolumeID: "vol-1", VMID: "vm-1",
		DevicePath: "/dev/vdc", CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected,
		Size: 1 << 30, LastSync: now, CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func (w *fenceWorld) requireStopped(t *testing.T, done <-chan engine.Result) {
	t.Helper()
	select {
	case res := <-done:
		if res != engine.Lost {
			t.Fatalf("late executor's result %v, want Lost", res)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("late executor did not stop")
	}
	if !strings.Contains(w.log.String(), "taken over by another executor") {
		t.Fatalf("late executor stopped without saying why:\n%s", w.log.String())
	}
}

// TestLateAttachWritesNothing: executor B runs an attach and is paused
// while it polls the CloudStack job. A takes the operation over (attempt
// 2) and completes it, then a detach of the volume completes: no mapping.
// B resumes, sees the job done, and must not record the mapping again.
func TestLateAttachWritesNothing(t *testing.T) {
	for _, agent := range []bool{false, true} {
		t.Run(map[bool]string{false: "no device agent", true: "device agent"}[agent], func(t *testing.T) {
			lateAttach(t, agent)
		})
	}
}

func lateAttach(t *testing.T, agent bool) {
	w := newFenceWorld(t, "", agent)
	w.accepted(t, "op-attach", commands.OpAttach, commands.AttachRequest{VolumeID: "vol-1", VMID: "vm-1"})
	done := w.runB("op-attach")
	<-w.cloud.polling // B polls the job: pause it there

	w.takeOver(t, "op-attach") // A: attempt 2, completed, mapping recorded …
	m := w.mapped(t, "mapping-a")
	ctx := context.Background()
	if err := w.store.DeleteMapping(ctx, "vol-1", m.Revision); err != nil { // … then a detach completed
		t.Fatal(err)
	}
	w.cloud.set("")

	close(w.cloud.gate) // B resumes: its job is done
	w.requireStopped(t, done)
	if got, err := w.store.GetMapping(ctx, "vol-1"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("late attach recorded a mapping of a detached volume: %+v (%v)", got, err)
	}
	op, _ := w.store.GetOperation(ctx, "op-attach")
	if op.Status != commands.StatusCompleted || op.Attempts != 2 {
		t.Fatalf("operation after the late executor: %s, attempt %d", op.Status, op.Attempts)
	}
}

// TestLateDetachWritesNothing is the mirror: B runs a detach and is paused
// while it polls the job. A completes the detach, then an attach of the
// volume completes with a new mapping and export. B resumes and must not
// end that export, release its device or delete its mapping.
func TestLateDetachWritesNothing(t *testing.T) {
	for _, tc := range []struct {
		name          string
		agent, export bool
	}{{"no device agent, no export", false, false}, {"device agent", true, false}, {"export", false, true}} {
		t.Run(tc.name, func(t *testing.T) { lateDetach(t, tc.agent, tc.export) })
	}
}

func lateDetach(t *testing.T, agent, export bool) {
	w := newFenceWorld(t, "vm-1", agent)
	old := w.mapped(t, "mapping-old")
	w.accepted(t, "op-detach", commands.OpDetach, commands.VolumeRequest{VolumeID: "vol-1"})
	done := w.runB("op-detach")
	<-w.cloud.polling

	ctx := context.Background()
	w.takeOver(t, "op-detach") // A: the detach completed …
	if err := w.store.DeleteMapping(ctx, "vol-1", old.Revision); err != nil {
		t.Fatal(err)
	}
	newer := w.mapped(t, "mapping-new") // … then a newer attach, maybe exported
	if export {
		if _, err := w.store.PutExport(ctx, commands.Export{VolumeID: "vol-1", VMID: "vm-1", ExportName: "vol1",
			DevicePath: "/dev/vdc", Status: commands.ExportActive}); err != nil {
			t.Fatal(err)
		}
	}
	w.cloud.set("vm-1")

	close(w.cloud.gate)
	w.requireStopped(t, done)
	if got, err := w.store.GetMapping(ctx, "vol-1"); err != nil || got.ID != newer.ID {
		t.Fatalf("late detach changed the newer mapping: %+v (%v)", got, err)
	}
	if _, err := w.store.GetExport(ctx, "vol-1"); export && err != nil {
		t.Fatalf("late detach ended the newer attach's export: %v", err)
	}
	if len(w.devices.released) != 0 {
		t.Fatalf("late detach released the device of the newer attach: %v", w.devices.released)
	}
}

// TestLateWriteUndone: a writer whose claim is lost between its fence
// check and its write (paused in between) finds it lost on the check
// after the write and takes its write back.
func TestLateWriteUndone(t *testing.T) {
	w := newFenceWorld(t, "", false)
	ctx := context.Background()
	f := &flipFence{}
	now := time.Now().UTC()
	m := commands.Mapping{ID: "mapping-late", VolumeID: "vol-1", VMID: "vm-1", LinuxState: commands.LinuxNotApplicable,
		CloudStackState: commands.CloudStackAttached, LastSync: now, CreatedAt: now, UpdatedAt: now}
	if _, err := w.writer.Put(ctx, f, m); !errors.Is(err, engine.ErrLost) {
		t.Fatalf("late write: %v, want ErrLost", err)
	}
	if got, err := w.store.GetMapping(ctx, "vol-1"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("late write left its mapping: %+v (%v)", got, err)
	}
	prev := w.mapped(t, "mapping-prev")
	changed := prev
	changed.DevicePath = "/dev/vdz"
	if _, err := w.writer.Put(ctx, &flipFence{}, changed); !errors.Is(err, engine.ErrLost) {
		t.Fatalf("late update: %v, want ErrLost", err)
	}
	if got, _ := w.store.GetMapping(ctx, "vol-1"); got.DevicePath != prev.DevicePath {
		t.Fatalf("late update left its device path %s, want %s back", got.DevicePath, prev.DevicePath)
	}
}

// flipFence holds at the first check and is lost from the second on.
type flipFence struct{ checks int }

func (f *flipFence) Check(context.Context) error {
	if f.checks++; f.checks > 1 {
		return engine.ErrLost
	}
	return nil
}
