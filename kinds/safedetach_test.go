package kinds_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// fakeUsers is the in-use check: the users of each volume, or err.
type fakeUsers struct {
	mu    sync.Mutex
	users map[string][]commands.DeviceUser
	err   error
	asked int
}

var _ engine.UseChecker = (*fakeUsers)(nil)

func (u *fakeUsers) Users(_ context.Context, m commands.Mapping) ([]commands.DeviceUser, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.asked++
	return u.users[m.VolumeID], u.err
}

// lingeringDevices is a device agent side whose device stays on the VM
// until the test lets it go: Detached fails with ErrDevicePresent while
// it is there.
type lingeringDevices struct {
	mu      sync.Mutex
	present bool
	calls   int
	called  chan struct{} // gets a value at each Detached call
}

var _ engine.Devices = (*lingeringDevices)(nil)

func (d *lingeringDevices) HasAgent(context.Context, string) bool { return true }

func (d *lingeringDevices) Attached(context.Context, commands.Mapping, time.Time) (commands.Mapping, error) {
	return commands.Mapping{}, errors.New("not in this test")
}

func (d *lingeringDevices) Detached(_ context.Context, m commands.Mapping) error {
	d.mu.Lock()
	d.calls++
	present := d.present
	d.mu.Unlock()
	select {
	case d.called <- struct{}{}:
	default:
	}
	if present {
		return fmt.Errorf("device %s: %w", m.DevicePath, engine.ErrDevicePresent)
	}
	return nil
}

func (d *lingeringDevices) gone() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.present = false
}

// detachWorld is csfake's CloudStack, a memstore and the kinds, with a
// volume attached to csfake.VMID, mapped and exported.
type detachWorld struct {
	cloud   *csfake.Cloud
	store   *memstore.Store
	users   *fakeUsers
	devices *lingeringDevices
	engine  *engine.Engine
	vol     string
}

func newDetachWorld(t *testing.T, wait time.Duration) *detachWorld {
	t.Helper()
	ctx := context.Background()
	w := &detachWorld{cloud: csfake.New(csfake.Default()), store: memstore.New(),
		users: &fakeUsers{users: map[string][]commands.DeviceUser{}}, devices: &lingeringDevices{called: make(chan struct{}, 1)}}
	vol, job, err := w.cloud.CreateVolume(ctx, csapi.CreateParams{Name: "data", SizeGiB: 1, DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.cloud.WaitJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	w.vol = vol
	if job, err = w.cloud.AttachVolume(ctx, vol, csfake.VMID, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := w.cloud.WaitJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	id := &commands.DeviceIdentity{Name: "vdb", Major: 252, Minor: 16, DiskSeq: 9}
	if _, err := w.store.PutMapping(ctx, commands.Mapping{ID: "mapping-1", VolumeID: vol, VMID: csfake.VMID, DevicePath: "/dev/vdb",
		CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected, Size: 1 << 30, DeviceIdentity: id,
		LastSync: now, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	if _, err := w.store.PutExport(ctx, commands.Export{VolumeID: vol, VMID: csfake.VMID, ExportName: "vol00000001",
		DevicePath: "/dev/vdb", DeviceIdentity: id, Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(&lockedBuffer{}, nil))
	writer := engine.NewMappingWriter(w.store, nil, log)
	exports := storeExports{w.store}
	rel := &engine.Releaser{Mappings: writer, Exports: exports, Devices: w.devices, InUse: w.users, Wait: wait, Log: log}
	w.engine = engine.New(engine.Config{Operations: w.store, Publisher: nopEvents{}, Logger: log,
		Timing: engine.Timing{StepTimeout: time.Minute, SettleTimeout: time.Second, Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}},
		kinds.All(kinds.Deps{CloudStack: w.cloud, Operations: w.store, Mappings: writer, Release: rel,
			Devices: w.devices, Exports: exports, Log: log})...)
	return w
}

// record records a pending operation of typ on the volume.
func (w *detachWorld) record(t *testing.T, id string, typ commands.OpType, force bool) {
	t.Helper()
	raw, _ := json.Marshal(commands.VolumeRequest{VolumeID: w.vol, Force: force})
	now := time.Now().UTC()
	if _, err := w.store.CreateOperation(context.Background(), commands.Operation{ID: id, Type: typ, Status: commands.StatusPending,
		VolumeID: w.vol, Request: raw, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
}

// run records and runs an operation to its end.
func (w *detachWorld) run(t *testing.T, id string, typ commands.OpType, force bool) commands.Operation {
	t.Helper()
	w.record(t, id, typ, force)
	if res := w.engine.Run(context.Background(), id, slog.Default()); res != engine.Done {
		t.Fatalf("run %s: result %v", id, res)
	}
	op, err := w.store.GetOperation(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return op
}

func (w *detachWorld) has(t *testing.T) (mapping, export bool) {
	t.Helper()
	_, merr := w.store.GetMapping(context.Background(), w.vol)
	_, eerr := w.store.GetExport(context.Background(), w.vol)
	for _, err := range []error{merr, eerr} {
		if err != nil && !errors.Is(err, state.ErrNotFound) {
			t.Fatal(err)
		}
	}
	return merr == nil, eerr == nil
}

func (w *detachWorld) setUsers(users ...commands.DeviceUser) {
	w.users.mu.Lock()
	defer w.users.mu.Unlock()
	w.users.users[w.vol] = users
}

var (
	mounted   = commands.DeviceUser{Kind: commands.UserMount, Device: "/dev/vdb1", MountPoint: "/srv/data"}
	dmHeld    = commands.DeviceUser{Kind: commands.UserHolder, Device: "/dev/vdb", Holder: "dm-0 (vg-lv)"}
	opened    = commands.DeviceUser{Kind: commands.UserProcess, Device: "/dev/vdb", PID: 4242, Command: "sleep"}
	nbdClient = commands.DeviceUser{Kind: commands.UserNBDClient, Device: "/dev/vdb", Export: "vol00000001", Clients: 1}
)

// TestDetachRefusedWhileInUse: a detach of a volume in use fails with
// CONFLICT naming the holder and does nothing (no detachVolume, mapping
// and export kept: NBD clients are not cut); the same detach with force
// detaches and ends the export.
func TestDetachRefusedWhileInUse(t *testing.T) {
	for _, tc := range []struct {
		name string
		user commands.DeviceUser
		says string
	}{
		{"mounted", mounted, "/dev/vdb1 mounted on /srv/data"},
		{"held", dmHeld, "/dev/vdb held by dm-0 (vg-lv)"},
		{"open", opened, "pid 4242 (sleep) has /dev/vdb open"},
		{"nbd client", nbdClient, "NBD export vol00000001 has 1 connected client(s)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newDetachWorld(t, time.Second)
			w.setUsers(tc.user)
			op := w.run(t, "op-1", commands.OpDetach, false)
			if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeConflict || !strings.Contains(op.Error, tc.says) {
				t.Fatalf("detach in use: %s %v %q, want FAILED CONFLICT saying %q", op.Status, op.Details, op.Error, tc.says)
			}
			var users []commands.DeviceUser
			raw, _ := json.Marshal(op.Details["users"])
			if err := json.Unmarshal(raw, &users); err != nil || len(users) != 1 || users[0] != tc.user {
				t.Fatalf("details users = %s (%v), want [%+v]", raw, err, tc.user)
			}
			if n := w.cloud.CallsOf(csfake.CmdDetachVolume); n != 0 {
				t.Fatalf("detachVolume called %d times on a volume in use", n)
			}
			if m, e := w.has(t); !m || !e {
				t.Fatalf("mapping %v export %v after a refused detach, want both kept", m, e)
			}

			op = w.run(t, "op-2", commands.OpDetach, true)
			if op.Status != commands.StatusCompleted {
				t.Fatalf("forced detach: %s %q", op.Status, op.Error)
			}
			if n := w.cloud.Detaches(w.vol); n != 1 {
				t.Fatalf("forced detach: %d detaches", n)
			}
			if m, e := w.has(t); m || e {
				t.Fatalf("mapping %v export %v after a forced detach", m, e)
			}
		})
	}
}

// TestDetachInUseUnknown: when the check cannot tell (an agent that does
// not answer), the detach fails SERVICE_UNAVAILABLE and does nothing;
// force skips the check.
func TestDetachInUseUnknown(t *testing.T) {
	w := newDetachWorld(t, time.Second)
	w.users.err = errors.New("device agent request failed: users of /dev/vdb on VM x: timeout")
	op := w.run(t, "op-1", commands.OpDetach, false)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeServiceUnavailable || !strings.Contains(op.Error, "force skips") {
		t.Fatalf("detach, check failing: %s %v %q", op.Status, op.Details, op.Error)
	}
	if n := w.cloud.CallsOf(csfake.CmdDetachVolume); n != 0 {
		t.Fatalf("detachVolume called %d times", n)
	}
	w.users.mu.Lock()
	asked := w.users.asked
	w.users.mu.Unlock()
	if op := w.run(t, "op-2", commands.OpDetach, true); op.Status != commands.StatusCompleted {
		t.Fatalf("forced detach: %s %q", op.Status, op.Error)
	}
	w.users.mu.Lock()
	defer w.users.mu.Unlock()
	if w.users.asked != asked {
		t.Fatal("a forced detach asked who uses the volume")
	}
}

// TestDeleteRefusedWhileInUse: a volume detached in CloudStack whose
// device is still on its VM, mounted, is not deleted without force.
func TestDeleteRefusedWhileInUse(t *testing.T) {
	w := newDetachWorld(t, time.Second)
	ctx := context.Background()
	job, err := w.cloud.DetachVolume(ctx, w.vol) // behind volumed's back
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.cloud.WaitJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	w.setUsers(mounted)
	op := w.run(t, "op-1", commands.OpDelete, false)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeConflict || !strings.Contains(op.Error, "mounted on /srv/data") {
		t.Fatalf("delete in use: %s %v %q", op.Status, op.Details, op.Error)
	}
	if n := w.cloud.CallsOf(csfake.CmdDeleteVolume); n != 0 {
		t.Fatalf("deleteVolume called %d times on a volume in use", n)
	}
	if op := w.run(t, "op-2", commands.OpDelete, true); op.Status != commands.StatusCompleted {
		t.Fatalf("forced delete: %s %q", op.Status, op.Error)
	}
	if _, err := w.cloud.GetVolume(ctx, w.vol); !errors.Is(err, csapi.ErrNotFound) {
		t.Fatalf("volume after a forced delete: %v", err)
	}
}

// TestDetachWaitsForDevice: CloudStack answers the detach, but the
// operation completes only once the device agent reports the device
// gone; until then it is executing at the release step with the mapping
// kept.
func TestDetachWaitsForDevice(t *testing.T) {
	w := newDetachWorld(t, time.Minute)
	w.devices.present = true
	w.record(t, "op-1", commands.OpDetach, false)
	done := make(chan engine.Result, 1)
	go func() { done <- w.engine.Run(context.Background(), "op-1", slog.Default()) }()
	for range 3 { // three releases that find the device still there
		select {
		case <-w.devices.called:
		case <-time.After(10 * time.Second):
			t.Fatal("the release never asked the device agent")
		}
	}
	op, err := w.store.GetOperation(context.Background(), "op-1")
	if err != nil {
		t.Fatal(err)
	}
	if op.Status != commands.StatusExecuting || op.Step != engine.StepRelease {
		t.Fatalf("while the device is there: %s at %q, want executing at %s", op.Status, op.Step, engine.StepRelease)
	}
	if v, err := w.cloud.GetVolume(context.Background(), w.vol); err != nil || v.VMID != "" {
		t.Fatalf("CloudStack: %+v %v, want detached", v, err)
	}
	if m, _ := w.has(t); !m {
		t.Fatal("mapping gone while the device is still there")
	}
	w.devices.gone()
	select {
	case res := <-done:
		if res != engine.Done {
			t.Fatalf("result %v", res)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the detach did not complete once the device went")
	}
	op, _ = w.store.GetOperation(context.Background(), "op-1")
	if op.Status != commands.StatusCompleted || op.Response == nil || op.Response.VMID != csfake.VMID {
		t.Fatalf("after the device went: %s %+v %q", op.Status, op.Response, op.Error)
	}
	if m, _ := w.has(t); m {
		t.Fatal("mapping kept after the detach completed")
	}
}

// TestDetachDeviceStaysTimesOut: a device that never goes fails the
// detach with TIMEOUT at the step deadline, naming the device; the
// mapping stays, as the device does.
func TestDetachDeviceStaysTimesOut(t *testing.T) {
	w := newDetachWorld(t, 300*time.Millisecond)
	w.devices.present = true
	op := w.run(t, "op-1", commands.OpDetach, false)
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeTimeout || !strings.Contains(op.Error, "still shows its device /dev/vdb") {
		t.Fatalf("device never gone: %s %v %q", op.Status, op.Details, op.Error)
	}
	if m, _ := w.has(t); !m {
		t.Fatal("mapping removed while the device is still there")
	}
}

// TestDetachResumesAtRelease: an executor killed while waiting for the
// device (CloudStack detached, step recorded) is resumed by the next
// delivery: it does not ask who uses the volume again (the device may be
// busy going), waits for the device, and completes as a detach of the VM.
func TestDetachResumesAtRelease(t *testing.T) {
	w := newDetachWorld(t, time.Minute)
	ctx := context.Background()
	job, err := w.cloud.DetachVolume(ctx, w.vol)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.cloud.WaitJob(ctx, job); err != nil {
		t.Fatal(err)
	}
	w.setUsers(opened)
	w.record(t, "op-1", commands.OpDetach, false)
	op, err := w.store.GetOperation(ctx, "op-1")
	if err != nil {
		t.Fatal(err)
	}
	vm := csfake.VMID
	op.Status, op.Attempts, op.Step, op.JobID, op.VMID = commands.StatusExecuting, 1, engine.StepRelease, job, &vm
	if _, err := w.store.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if res := w.engine.Run(ctx, "op-1", slog.Default()); res != engine.Done {
		t.Fatalf("result %v", res)
	}
	op, _ = w.store.GetOperation(ctx, "op-1")
	if op.Status != commands.StatusCompleted || op.Response == nil || op.Response.VMID != vm || op.Response.Message != "Volume detached successfully" {
		t.Fatalf("resumed detach: %s %+v %q", op.Status, op.Response, op.Error)
	}
	if w.users.asked != 0 {
		t.Fatal("a resumed detach asked who uses the volume")
	}
	if n := w.cloud.Detaches(w.vol); n != 1 {
		t.Fatalf("%d detaches, want the one before the crash", n)
	}
}
