package kinds_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/stores/memstore"
)

// fakeSizes is the device side of a resize: the device shows the size
// asked for, or, with stuck, stays at the size it had.
type fakeSizes struct {
	mu    sync.Mutex
	stuck bool
	asked []int64
}

func (s *fakeSizes) Resized(_ context.Context, m commands.Mapping, size int64) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.asked = append(s.asked, size)
	if s.stuck {
		return m.Size, errors.New("device did not grow (test)")
	}
	return size, nil
}

// life is the CloudStack fake, a store and every kind, run by an engine.
type life struct {
	t       *testing.T
	ctx     context.Context
	cloud   *csfake.Cloud
	store   *memstore.Store
	devices *recordingDevices
	sizes   *fakeSizes
	engine  *engine.Engine
}

func newLife(t *testing.T, agent bool) *life {
	t.Helper()
	w := &life{t: t, ctx: context.Background(), cloud: csfake.New(csfake.Default()), store: memstore.New(),
		devices: &recordingDevices{agent: agent}, sizes: &fakeSizes{}}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	writer := engine.NewMappingWriter(w.store, nil, log)
	exports := storeExports{w.store}
	rel := &engine.Releaser{Mappings: writer, Exports: exports, Devices: w.devices, Log: log}
	w.engine = engine.New(engine.Config{Operations: w.store, Publisher: nopEvents{}, Logger: log,
		Timing: engine.Timing{StepTimeout: 10 * time.Second, SettleTimeout: 100 * time.Millisecond,
			Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}},
		kinds.All(kinds.Deps{CloudStack: w.cloud, Operations: w.store, Mappings: writer, Release: rel,
			Devices: w.devices, Sizes: w.sizes, Exports: exports, Log: log})...)
	return w
}

// must fails the test on err.
func (w *life) must(err error) {
	w.t.Helper()
	if err != nil {
		w.t.Fatal(err)
	}
}

// wait follows a job of the fake to its end.
func (w *life) wait(jobID string, err error) {
	w.t.Helper()
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, jobID)
	w.must(err)
}

// readyVolume makes a Ready 1 GiB volume (attached once), attached to
// vmID or detached ("").
func (w *life) readyVolume(vmID string) string {
	w.t.Helper()
	id, job, err := w.cloud.CreateVolume(w.ctx, csapi.CreateParams{Name: "v-" + uuid.NewString()[:8], SizeGiB: 1,
		DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
	w.wait(job, err)
	w.wait(w.cloud.AttachVolume(w.ctx, id, csfake.VMID, nil))
	if vmID == "" {
		w.wait(w.cloud.DetachVolume(w.ctx, id))
	}
	return id
}

// snapshotOf takes a snapshot of a volume directly in the fake.
func (w *life) snapshotOf(volumeID, name string) string {
	w.t.Helper()
	id, job, err := w.cloud.CreateSnapshot(w.ctx, csapi.SnapshotParams{VolumeID: volumeID, Name: name})
	w.wait(job, err)
	return id
}

// op records an operation; a step (and job) makes it one a crashed
// executor left there.
func (w *life) op(typ commands.OpType, volumeID string, req any, step, jobID string) string {
	w.t.Helper()
	raw, _ := json.Marshal(req)
	now := time.Now().UTC()
	op, err := w.store.CreateOperation(w.ctx, commands.Operation{ID: "op-" + uuid.NewString(), Type: typ,
		Status: commands.StatusPending, VolumeID: volumeID, Request: raw, CreatedAt: now, UpdatedAt: now})
	w.must(err)
	if step != "" {
		op.Status, op.Step, op.JobID, op.Attempts = commands.StatusExecuting, step, jobID, 1
		_, err = w.store.UpdateOperation(w.ctx, op)
		w.must(err)
	}
	return op.ID
}

// run runs an operation to its end and returns it.
func (w *life) run(id string) commands.Operation {
	w.t.Helper()
	if res := w.engine.Run(w.ctx, id, slog.New(slog.NewTextHandler(io.Discard, nil))); res != engine.Done {
		w.t.Fatalf("run: result %v, want Done", res)
	}
	op, err := w.store.GetOperation(w.ctx, id)
	w.must(err)
	return op
}

func (w *life) vol(id string) csapi.Volume {
	w.t.Helper()
	v, err := w.cloud.GetVolume(w.ctx, id)
	w.must(err)
	return v
}

// wantOutcome checks an operation's end: completed, or failed with code
// (and the CloudStack code, when not 0).
func wantOutcome(t *testing.T, op commands.Operation, code string, csCode int) {
	t.Helper()
	if code == "" {
		if op.Status != commands.StatusCompleted {
			t.Fatalf("operation %s: %s (%s), want completed", op.Type, op.Status, op.Error)
		}
		return
	}
	if op.Status != commands.StatusFailed || op.Details["code"] != code {
		t.Fatalf("operation %s: %s %v (%s), want failed %s", op.Type, op.Status, op.Details, op.Error, code)
	}
	if csCode != 0 && fmt.Sprint(op.Details["cloudstack_error_code"]) != fmt.Sprint(csCode) {
		t.Fatalf("cloudstack_error_code %v, want %d (%s)", op.Details["cloudstack_error_code"], csCode, op.Error)
	}
}

// TestSnapshotResumes: a snapshot operation takes exactly one snapshot
// from every point a delivery can find it at, and after a lost answer.
func TestSnapshotResumes(t *testing.T) {
	for _, tc := range []struct {
		name string
		// prep runs before the operation, given its volume and the
		// snapshot name; it returns the step and job the operation is
		// found at.
		prep      func(w *life, vol, name string) (step, job string)
		reqName   string
		quiesce   bool
		code      string
		csCode    int
		wantSnaps int
	}{
		{name: "fresh", wantSnaps: 1},
		{name: "named", reqName: "before-failover", wantSnaps: 1},
		{name: "lost answer", wantSnaps: 1, prep: func(w *life, _, _ string) (string, string) {
			w.cloud.Script(csfake.CmdCreateSnapshot, csfake.Fault{LostAnswer: true})
			return "", ""
		}},
		{name: "crash after the call", wantSnaps: 1, prep: func(w *life, vol, name string) (string, string) {
			w.snapshotOf(vol, name)
			return kinds.StepSnapshotRequested, ""
		}},
		{name: "crash before the call", wantSnaps: 1, prep: func(*life, string, string) (string, string) {
			return kinds.StepSnapshotRequested, ""
		}},
		{name: "crash while the job ran", wantSnaps: 1, prep: func(w *life, vol, name string) (string, string) {
			_, job, err := w.cloud.CreateSnapshot(w.ctx, csapi.SnapshotParams{VolumeID: vol, Name: name})
			w.must(err)
			return kinds.StepSnapshotJob, job
		}},
		{name: "job expunged", wantSnaps: 1, prep: func(w *life, _, _ string) (string, string) {
			w.cloud.Script(csfake.CmdCreateSnapshot, csfake.Fault{Job: csfake.JobExpunged})
			return "", ""
		}},
		{name: "job fails", code: commands.CodeCloudStackError, csCode: 530, wantSnaps: 1, prep: func(w *life, _, _ string) (string, string) {
			w.cloud.Script(csfake.CmdCreateSnapshot, csfake.Fault{Job: csfake.JobFails})
			return "", ""
		}},
		// quiesce reaches CloudStack, whose refusal fails the operation
		// with its code and text (the snapshot it allocated is in Error).
		{name: "quiesced", quiesce: true, code: commands.CodeCloudStackError, csCode: 530, wantSnaps: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newLife(t, false)
			vol := w.readyVolume("")
			req := commands.SnapshotRequest{VolumeID: vol, Name: tc.reqName, Quiesce: tc.quiesce}
			id := "op-" + uuid.NewString()
			name := commands.SnapshotName(id, tc.reqName)
			step, job := "", ""
			if tc.prep != nil {
				step, job = tc.prep(w, vol, name)
			}
			// The operation's id is the one its name derives from.
			id = w.opWithID(id, commands.OpSnapshot, vol, req, step, job)
			op := w.run(id)
			wantOutcome(t, op, tc.code, tc.csCode)
			if refused := csfake.QuiesceRefused(vol); tc.quiesce != strings.Contains(op.Error, refused) {
				t.Errorf("error %q, want CloudStack's %q: %v", op.Error, refused, tc.quiesce)
			}
			snaps, err := w.cloud.ListSnapshots(w.ctx, csapi.SnapshotFilter{VolumeID: vol})
			w.must(err)
			if len(snaps) != tc.wantSnaps {
				t.Fatalf("%d snapshots, want %d: %+v", len(snaps), tc.wantSnaps, snaps)
			}
			if n := w.cloud.CallsOf(csfake.CmdCreateSnapshot); n != 1 {
				t.Errorf("createSnapshot called %d times, want 1", n)
			}
			if tc.code == "" && (op.Response == nil || op.Response.SnapshotID != snaps[0].ID || snaps[0].Name != name ||
				snaps[0].State != csapi.SnapshotBackedUp) {
				t.Errorf("response %+v, snapshot %+v (name %s)", op.Response, snaps[0], name)
			}
		})
	}
}

// opWithID is op with a given operation id.
func (w *life) opWithID(id string, typ commands.OpType, volumeID string, req any, step, jobID string) string {
	w.t.Helper()
	raw, _ := json.Marshal(req)
	now := time.Now().UTC()
	op, err := w.store.CreateOperation(w.ctx, commands.Operation{ID: id, Type: typ,
		Status: commands.StatusPending, VolumeID: volumeID, Request: raw, CreatedAt: now, UpdatedAt: now})
	w.must(err)
	if step != "" {
		op.Status, op.Step, op.JobID, op.Attempts = commands.StatusExecuting, step, jobID, 1
		_, err = w.store.UpdateOperation(w.ctx, op)
		w.must(err)
	}
	return id
}

// TestDeleteSnapshotResumes: a snapshot is deleted once, and one that is
// gone counts as deleted.
func TestDeleteSnapshotResumes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		prep      func(w *life, snap string) (step, job string)
		code      string
		wantCalls int64
		gone      bool
	}{
		{name: "fresh", wantCalls: 1, gone: true},
		{name: "lost answer", wantCalls: 1, gone: true, prep: func(w *life, _ string) (string, string) {
			w.cloud.Script(csfake.CmdDeleteSnapshot, csfake.Fault{LostAnswer: true})
			return "", ""
		}},
		{name: "crash after the call", wantCalls: 1, gone: true, prep: func(w *life, snap string) (string, string) {
			w.wait(w.cloud.DeleteSnapshot(w.ctx, snap))
			return kinds.StepDeleteSnapshotRequested, ""
		}},
		{name: "crash while the job ran", wantCalls: 1, gone: true, prep: func(w *life, snap string) (string, string) {
			job, err := w.cloud.DeleteSnapshot(w.ctx, snap)
			w.must(err)
			return kinds.StepDeleteSnapshotJob, job
		}},
		{name: "already deleted", wantCalls: 1, gone: true, prep: func(w *life, snap string) (string, string) {
			w.wait(w.cloud.DeleteSnapshot(w.ctx, snap))
			return "", ""
		}},
		{name: "job fails", code: commands.CodeCloudStackError, wantCalls: 1, prep: func(w *life, _ string) (string, string) {
			w.cloud.Script(csfake.CmdDeleteSnapshot, csfake.Fault{Job: csfake.JobFails})
			return "", ""
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newLife(t, false)
			vol := w.readyVolume("")
			snap := w.snapshotOf(vol, "s")
			step, job := "", ""
			if tc.prep != nil {
				step, job = tc.prep(w, snap)
			}
			op := w.run(w.op(commands.OpDeleteSnapshot, vol, commands.SnapshotIDRequest{SnapshotID: snap}, step, job))
			wantOutcome(t, op, tc.code, 0)
			if n := w.cloud.CallsOf(csfake.CmdDeleteSnapshot); n != tc.wantCalls {
				t.Errorf("deleteSnapshot called %d times, want %d", n, tc.wantCalls)
			}
			_, err := w.cloud.GetSnapshot(w.ctx, snap)
			if gone := errors.Is(err, csapi.ErrNotFound); gone != tc.gone {
				t.Errorf("snapshot gone %v, want %v (%v)", gone, tc.gone, err)
			}
		})
	}
}

// TestRevertResumes: a revert gives the volume the snapshot's state (its
// size here), fails with CloudStack's code and text when CloudStack
// refuses, and is sent again after a lost answer.
func TestRevertResumes(t *testing.T) {
	for _, tc := range []struct {
		name      string
		attached  bool
		stopped   bool // the VM it is attached to is Stopped
		prep      func(w *life, snap string) (step, job string)
		other     bool // a snapshot of another volume
		code      string
		csCode    int
		text      string
		wantCalls int64
	}{
		{name: "detached", wantCalls: 1},
		{name: "attached to a running VM", attached: true, code: commands.CodeCloudStackError, csCode: 431,
			text: "not in the shutdown state", wantCalls: 1},
		{name: "attached to a stopped VM", attached: true, stopped: true, wantCalls: 1},
		{name: "lost answer: sent again", wantCalls: 2, prep: func(w *life, _ string) (string, string) {
			w.cloud.Script(csfake.CmdRevertSnapshot, csfake.Fault{LostAnswer: true})
			return "", ""
		}},
		{name: "crash while the job ran", wantCalls: 1, prep: func(w *life, snap string) (string, string) {
			job, err := w.cloud.RevertSnapshot(w.ctx, snap)
			w.must(err)
			return kinds.StepRevertJob, job
		}},
		{name: "crash before the call", wantCalls: 1, prep: func(*life, string) (string, string) {
			return kinds.StepRevertRequested, ""
		}},
		{name: "snapshot of another volume", other: true, code: commands.CodeInvalidRequest, wantCalls: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newLife(t, false)
			vm := ""
			if tc.attached {
				vm = csfake.VMID
			}
			vol := w.readyVolume(vm)
			snap := w.snapshotOf(vol, "s")
			if tc.other {
				snap = w.snapshotOf(w.readyVolume(""), "other")
			}
			// The volume grows after the snapshot: the revert shrinks it back.
			w.wait(w.cloud.ResizeVolume(w.ctx, vol, 2, false))
			if tc.stopped {
				w.cloud.SetVMState(csfake.VMID, csfake.Stopped)
			}
			step, job := "", ""
			if tc.prep != nil {
				step, job = tc.prep(w, snap)
			}
			op := w.run(w.op(commands.OpRevert, vol, commands.RevertRequest{VolumeID: vol, SnapshotID: snap}, step, job))
			wantOutcome(t, op, tc.code, tc.csCode)
			if tc.text != "" && !strings.Contains(op.Error, tc.text) {
				t.Errorf("error %q, want CloudStack's text %q", op.Error, tc.text)
			}
			if n := w.cloud.CallsOf(csfake.CmdRevertSnapshot); n != tc.wantCalls {
				t.Errorf("revertSnapshot called %d times, want %d", n, tc.wantCalls)
			}
			wantSize := int64(2 << 30)
			if tc.code == "" {
				wantSize = 1 << 30
				if op.Response.Size != wantSize || op.Response.SnapshotID != snap {
					t.Errorf("response %+v", op.Response)
				}
			}
			if got := w.vol(vol).Size; got != wantSize {
				t.Errorf("volume size %d, want %d", got, wantSize)
			}
		})
	}
}

// TestResizeResumes: a resize is done once CloudStack shows the size, is
// never sent twice, refuses a shrink without shrink_ok with CloudStack's
// answer, and, for an attached volume whose VM has an agent, waits for the
// device before its mapping takes the size.
func TestResizeResumes(t *testing.T) {
	const gib = int64(1 << 30)
	for _, tc := range []struct {
		name      string
		attached  bool
		agent     bool
		stuck     bool
		size      int64
		shrinkOK  bool
		prep      func(w *life, vol string) (step, job string)
		code      string
		csCode    int
		wantCalls int64
		wantSize  int64
		// wantMapping is the mapping's size after; 0 for no mapping.
		wantMapping int64
		wantAsked   int
	}{
		{name: "detached", size: 3 * gib, wantCalls: 1, wantSize: 3 * gib},
		{name: "rounded up to GiB", size: 2*gib + 1, wantCalls: 1, wantSize: 3 * gib},
		{name: "already that size", size: gib, wantCalls: 0, wantSize: gib},
		{name: "lost answer", size: 3 * gib, wantCalls: 1, wantSize: 3 * gib, prep: func(w *life, _ string) (string, string) {
			w.cloud.Script(csfake.CmdResizeVolume, csfake.Fault{LostAnswer: true})
			return "", ""
		}},
		{name: "crash after the call", size: 3 * gib, wantCalls: 1, wantSize: 3 * gib, prep: func(w *life, vol string) (string, string) {
			w.wait(w.cloud.ResizeVolume(w.ctx, vol, 3, false))
			return kinds.StepResizeRequested, ""
		}},
		{name: "crash while the job ran", size: 3 * gib, wantCalls: 1, wantSize: 3 * gib, prep: func(w *life, vol string) (string, string) {
			job, err := w.cloud.ResizeVolume(w.ctx, vol, 3, false)
			w.must(err)
			return kinds.StepResizeJob, job
		}},
		{name: "shrink without shrink_ok", size: 2 * gib, code: commands.CodeCloudStackError, csCode: 431, wantCalls: 2, wantSize: 4 * gib,
			prep: func(w *life, vol string) (string, string) {
				w.wait(w.cloud.ResizeVolume(w.ctx, vol, 4, false))
				return "", ""
			}},
		{name: "shrink with shrink_ok", size: 2 * gib, shrinkOK: true, wantCalls: 2, wantSize: 2 * gib,
			prep: func(w *life, vol string) (string, string) {
				w.wait(w.cloud.ResizeVolume(w.ctx, vol, 4, false))
				return "", ""
			}},
		{name: "attached, agent: device follows", attached: true, agent: true, size: 3 * gib, wantCalls: 1, wantSize: 3 * gib,
			wantMapping: 3 * gib, wantAsked: 1},
		{name: "attached, agent: crash while waiting for the device", attached: true, agent: true, size: 3 * gib, wantCalls: 1,
			wantSize: 3 * gib, wantMapping: 3 * gib, wantAsked: 1, prep: func(w *life, vol string) (string, string) {
				w.wait(w.cloud.ResizeVolume(w.ctx, vol, 3, false))
				return kinds.StepResizeDevice, ""
			}},
		{name: "attached, agent: device stays small", attached: true, agent: true, stuck: true, size: 3 * gib,
			code: commands.CodeTimeout, wantCalls: 1, wantSize: 3 * gib, wantMapping: gib, wantAsked: 1},
		{name: "attached, no agent: CloudStack's answer", attached: true, size: 3 * gib, wantCalls: 1, wantSize: 3 * gib,
			wantMapping: 3 * gib},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newLife(t, tc.agent)
			w.sizes.stuck = tc.stuck
			vm := ""
			if tc.attached {
				vm = csfake.VMID
			}
			vol := w.readyVolume(vm)
			if tc.attached {
				now := time.Now().UTC()
				_, err := w.store.PutMapping(w.ctx, commands.Mapping{ID: "mapping-1", VolumeID: vol, VMID: vm, DevicePath: "/dev/vdb",
					CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxDetected, Size: gib,
					LastSync: now, CreatedAt: now, UpdatedAt: now})
				w.must(err)
			}
			step, job := "", ""
			if tc.prep != nil {
				step, job = tc.prep(w, vol)
			}
			op := w.run(w.op(commands.OpResize, vol, commands.ResizeRequest{VolumeID: vol, Size: tc.size, ShrinkOK: tc.shrinkOK}, step, job))
			wantOutcome(t, op, tc.code, tc.csCode)
			if tc.csCode == 431 && !strings.Contains(op.Error+op.Details["cloudstack_message"].(string), "shrink") {
				t.Errorf("error %q %v, want CloudStack's shrink text", op.Error, op.Details)
			}
			if n := w.cloud.CallsOf(csfake.CmdResizeVolume); n != tc.wantCalls {
				t.Errorf("resizeVolume called %d times, want %d", n, tc.wantCalls)
			}
			if got := w.vol(vol).Size; got != tc.wantSize {
				t.Errorf("volume size %d, want %d", got, tc.wantSize)
			}
			if tc.code == "" && op.Response.Size != tc.wantSize {
				t.Errorf("response %+v, want size %d", op.Response, tc.wantSize)
			}
			if tc.wantMapping != 0 {
				m, err := w.store.GetMapping(w.ctx, vol)
				w.must(err)
				if m.Size != tc.wantMapping {
					t.Errorf("mapping size %d, want %d", m.Size, tc.wantMapping)
				}
			}
			if len(w.sizes.asked) != tc.wantAsked {
				t.Errorf("device asked %d times (%v), want %d", len(w.sizes.asked), w.sizes.asked, tc.wantAsked)
			}
		})
	}
}

// TestTagsResumes: a volume's tags become exactly the set asked for, each
// difference written once, after lost answers and crashes too.
func TestTagsResumes(t *testing.T) {
	for _, tc := range []struct {
		name       string
		have, want map[string]string
		prep       func(w *life, vol string) (step, job string)
		// wantCreates and wantDrops count the operation's calls (a call
		// made before a crash included).
		wantCreates, wantDrops int64
	}{
		{name: "from none", want: map[string]string{"env": "prod", "team": "storage"}, wantCreates: 1},
		{name: "replace", have: map[string]string{"env": "test", "keep": "x", "old": "y"},
			want: map[string]string{"env": "prod", "keep": "x"}, wantCreates: 1, wantDrops: 1},
		{name: "same", have: map[string]string{"env": "prod"}, want: map[string]string{"env": "prod"}},
		{name: "remove all", have: map[string]string{"env": "prod"}, want: map[string]string{}, wantDrops: 1},
		{name: "lost answer to createTags", want: map[string]string{"env": "prod"}, wantCreates: 1,
			prep: func(w *life, _ string) (string, string) {
				w.cloud.Script(csfake.CmdCreateTags, csfake.Fault{LostAnswer: true})
				return "", ""
			}},
		{name: "lost answer to deleteTags", have: map[string]string{"env": "test"}, want: map[string]string{}, wantDrops: 1,
			prep: func(w *life, _ string) (string, string) {
				w.cloud.Script(csfake.CmdDeleteTags, csfake.Fault{LostAnswer: true})
				return "", ""
			}},
		{name: "crash after createTags", want: map[string]string{"env": "prod"}, wantCreates: 1,
			prep: func(w *life, vol string) (string, string) {
				w.wait(w.cloud.CreateTags(w.ctx, vol, map[string]string{"env": "prod"}))
				return kinds.StepTagsCreateRequested, ""
			}},
		{name: "crash while deleteTags ran", have: map[string]string{"env": "test"}, want: map[string]string{"env": "prod"},
			wantCreates: 1, wantDrops: 1, prep: func(w *life, vol string) (string, string) {
				job, err := w.cloud.DeleteTags(w.ctx, vol, map[string]string{"env": "test"})
				w.must(err)
				return kinds.StepTagsDeleteJob, job
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newLife(t, false)
			vol := w.readyVolume("")
			setup := int64(0)
			if len(tc.have) > 0 {
				w.wait(w.cloud.CreateTags(w.ctx, vol, tc.have))
				setup = 1
			}
			step, job := "", ""
			if tc.prep != nil {
				step, job = tc.prep(w, vol)
			}
			op := w.run(w.op(commands.OpTags, vol, commands.TagsRequest{VolumeID: vol, Tags: tc.want}, step, job))
			wantOutcome(t, op, "", 0)
			if got := w.vol(vol).Tags; len(got) != len(tc.want) || (len(got) > 0 && !maps.Equal(got, tc.want)) {
				t.Errorf("tags %v, want %v", got, tc.want)
			}
			if n := w.cloud.CallsOf(csfake.CmdCreateTags) - setup; n != tc.wantCreates {
				t.Errorf("createTags called %d times, want %d", n, tc.wantCreates)
			}
			if n := w.cloud.CallsOf(csfake.CmdDeleteTags); n != tc.wantDrops {
				t.Errorf("deleteTags called %d times, want %d", n, tc.wantDrops)
			}
		})
	}
}

// TestCreateFromSnapshotWithMetadata: a create from a snapshot makes one
// volume from it, and its metadata becomes the volume's tags, written
// once, after lost answers to both calls.
func TestCreateFromSnapshotWithMetadata(t *testing.T) {
	for _, tc := range []struct {
		name string
		prep func(w *life)
	}{
		{name: "fresh"},
		{name: "lost answers", prep: func(w *life) {
			w.cloud.Script(csfake.CmdCreateVolume, csfake.Fault{LostAnswer: true})
			w.cloud.Script(csfake.CmdCreateTags, csfake.Fault{LostAnswer: true})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newLife(t, false)
			src := w.readyVolume("")
			snap := w.snapshotOf(src, "s")
			creates := w.cloud.CallsOf(csfake.CmdCreateVolume)
			if tc.prep != nil {
				tc.prep(w)
			}
			name := "from-" + uuid.NewString()[:8]
			op := w.run(w.op(commands.OpCreate, "", commands.CreateRequest{Name: name, SnapshotID: snap,
				Metadata: map[string]any{"purpose": "test-failover"}}, "", ""))
			wantOutcome(t, op, "", 0)
			vols, err := w.cloud.ListVolumes(w.ctx, csapi.ListFilter{Name: name})
			w.must(err)
			if len(vols) != 1 || vols[0].ID != op.VolumeID || vols[0].SnapshotID != snap {
				t.Fatalf("volumes %+v, want one from snapshot %s", vols, snap)
			}
			if vols[0].Tags["purpose"] != "test-failover" || len(vols[0].Tags) != 1 {
				t.Errorf("tags %v", vols[0].Tags)
			}
			if n := w.cloud.CallsOf(csfake.CmdCreateVolume) - creates; n != 1 {
				t.Errorf("createVolume called %d times, want 1", n)
			}
			if n := w.cloud.CallsOf(csfake.CmdCreateTags); n != 1 {
				t.Errorf("createTags called %d times, want 1", n)
			}
		})
	}
}
