package kinds_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/stores/memstore"
)

// world is the kinds run by an engine against the in-memory CloudStack
// and store: no NATS, no Redis, no simulator.
type world struct {
	t      *testing.T
	cloud  *csfake.Cloud
	store  *memstore.Store
	engine *engine.Engine
}

func newWorld(t *testing.T) *world {
	t.Helper()
	w := &world{t: t, cloud: csfake.New(csfake.Default()), store: memstore.New()}
	log := slog.New(slog.DiscardHandler)
	writer := engine.NewMappingWriter(w.store, nil, log)
	exports := storeExports{w.store}
	rel := &engine.Releaser{Mappings: writer, Exports: exports, Log: log}
	w.engine = engine.New(engine.Config{Operations: w.store, Publisher: nopEvents{}, Logger: log,
		Timing: engine.Timing{StepTimeout: 5 * time.Second, SettleTimeout: 50 * time.Millisecond,
			Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}},
		kinds.All(kinds.Deps{CloudStack: w.cloud, Operations: w.store, Mappings: writer, Release: rel,
			Exports: exports, Log: log, Catalog: listed{
				kinds.Zones:     {csfake.ZoneID},
				kinds.Offerings: {csfake.CustomOfferingID, csfake.FixedOfferingID},
				kinds.VMs:       {csfake.VMID, csfake.StoppedVMID},
			}})...)
	return w
}

// volume makes a volume in CloudStack, attached to vmID unless it is "".
func (w *world) volume(name, vmID string) string {
	w.t.Helper()
	ctx := context.Background()
	id, job, err := w.cloud.CreateVolume(ctx, csapi.CreateParams{Name: name, SizeGiB: 1,
		DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
	if err == nil {
		_, err = w.cloud.WaitJob(ctx, job)
	}
	if err == nil && vmID != "" {
		w.attachNow(id, vmID)
	}
	if err != nil {
		w.t.Fatalf("volume %s: %v", name, err)
	}
	return id
}

// attachNow attaches a volume in CloudStack behind volumed's back and
// returns the job's id.
func (w *world) attachNow(volID, vmID string) string {
	w.t.Helper()
	ctx := context.Background()
	job, err := w.cloud.AttachVolume(ctx, volID, vmID, nil)
	if err == nil {
		_, err = w.cloud.WaitJob(ctx, job)
	}
	if err != nil {
		w.t.Fatalf("attach %s: %v", volID, err)
	}
	return job
}

// failedJob returns the id of a job of command that failed in CloudStack
// and did nothing.
func (w *world) failedJob(command string, submit func() (string, error)) string {
	w.t.Helper()
	w.cloud.Script(command, csfake.Fault{Job: csfake.JobFails})
	job, err := submit()
	if err != nil {
		w.t.Fatalf("%s: %v", command, err)
	}
	if _, err := w.cloud.WaitJob(context.Background(), job); err == nil {
		w.t.Fatalf("job %s of %s did not fail", job, command)
	}
	return job
}

// releaseWhenPolled ends the pending jobs, in order, once the run polls
// a job: after the operation read the volume as the jobs left it.
func (w *world) releaseWhenPolled(jobs ...string) {
	polls := w.cloud.CallsOf(csfake.CmdQueryJob)
	done := make(chan struct{})
	w.t.Cleanup(func() { <-done })
	go func() {
		defer close(done)
		deadline := time.Now().Add(5 * time.Second)
		for w.cloud.CallsOf(csfake.CmdQueryJob) == polls && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		for _, j := range jobs {
			if err := w.cloud.Release(j); err != nil {
				w.t.Errorf("release %s: %v", j, err)
			}
		}
	}()
}

// opSeq numbers the operations the tests record.
var opSeq atomic.Int64

// resumed records an operation as an earlier attempt left it: its step
// and job (none for a fresh operation).
func (w *world) resumed(typ commands.OpType, volID string, vmID *string, req any, step, jobID string) string {
	w.t.Helper()
	raw, _ := json.Marshal(req)
	now := time.Now().UTC()
	op := commands.Operation{ID: fmt.Sprintf("op-%s-%d", typ, opSeq.Add(1)), Type: typ, Status: commands.StatusPending, VolumeID: volID, VMID: vmID,
		Request: raw, CreatedAt: now, UpdatedAt: now}
	rec, err := w.store.CreateOperation(context.Background(), op)
	if err != nil {
		w.t.Fatal(err)
	}
	if step != "" {
		rec.Status, rec.Attempts, rec.Step, rec.JobID = commands.StatusExecuting, 1, step, jobID
		if _, err := w.store.UpdateOperation(context.Background(), rec); err != nil {
			w.t.Fatal(err)
		}
	}
	return op.ID
}

// run runs the operation to its end and returns it.
func (w *world) run(id string) commands.Operation {
	w.t.Helper()
	if res := w.engine.Run(context.Background(), id, slog.New(slog.DiscardHandler)); res != engine.Done {
		w.t.Fatalf("run of %s: result %v, want Done", id, res)
	}
	op, err := w.store.GetOperation(context.Background(), id)
	if err != nil {
		w.t.Fatal(err)
	}
	return op
}

// want is what a row expects of the operation and of CloudStack.
type want struct {
	status commands.OpStatus
	code   string // details.code of a failed operation
	msg    string // the response's message of a completed one
	calls  int64  // calls of the row's command during the run
	mapped *bool  // the volume has a mapping after the run
}

func (w *world) check(op commands.Operation, command string, before int64, wt want) {
	w.t.Helper()
	if op.Status != wt.status {
		w.t.Fatalf("operation %s: %s (%s %v), want %s", op.ID, op.Status, op.Error, op.Details, wt.status)
	}
	if wt.code != "" && op.Details["code"] != wt.code {
		w.t.Fatalf("operation %s failed with %v, want code %s", op.ID, op.Details, wt.code)
	}
	if wt.msg != "" && (op.Response == nil || op.Response.Message != wt.msg) {
		w.t.Fatalf("operation %s answered %+v, want %q", op.ID, op.Response, wt.msg)
	}
	if got := w.cloud.CallsOf(command) - before; got != wt.calls {
		w.t.Fatalf("%s calls during the run: %d, want %d", command, got, wt.calls)
	}
	if wt.mapped != nil {
		_, err := w.store.GetMapping(context.Background(), op.VolumeID)
		if mapped := err == nil; mapped != *wt.mapped {
			w.t.Fatalf("volume %s mapped: %v (%v), want %v", op.VolumeID, mapped, err, *wt.mapped)
		}
	}
}

var yes, no = func() *bool { b := true; return &b }(), func() *bool { b := false; return &b }()

// TestAttachResumes: every branch an attach resumes from, as a crash or
// a lost answer left it.
func TestAttachResumes(t *testing.T) {
	vm := csfake.VMID
	for _, tc := range []struct {
		name string
		// setup prepares CloudStack and returns the volume, the step and
		// job an earlier attempt recorded.
		setup func(w *world) (vol, step, job string)
		want  want
	}{
		{"fresh", func(w *world) (string, string, string) { return w.volume("a", ""), "", "" },
			want{status: commands.StatusCompleted, msg: "Volume attached successfully", calls: 1, mapped: yes}},
		{"attach:job, job failed, volume attached to the VM by an earlier job", func(w *world) (string, string, string) {
			// An attach sent again after a crash: its job fails in
			// CloudStack because the first one, still running when the
			// operation resumed, attached the volume.
			vol := w.volume("a", "")
			w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{Job: csfake.JobPends}, csfake.Fault{Job: csfake.JobPends})
			first, _ := w.cloud.AttachVolume(context.Background(), vol, vm, nil)
			again, _ := w.cloud.AttachVolume(context.Background(), vol, vm, nil)
			w.releaseWhenPolled(first, again)
			return vol, kinds.StepAttachJob, again
		}, want{status: commands.StatusCompleted, calls: 0, mapped: yes}},
		{"attach:job, job failed, volume not attached", func(w *world) (string, string, string) {
			vol := w.volume("a", "")
			job := w.failedJob(csfake.CmdAttachVolume, func() (string, error) { return w.cloud.AttachVolume(context.Background(), vol, vm, nil) })
			return vol, kinds.StepAttachJob, job
		}, want{status: commands.StatusFailed, code: commands.CodeCloudStackError, calls: 0, mapped: no}},
		{"attach:job, job expunged after its effect", func(w *world) (string, string, string) {
			vol := w.volume("a", "")
			w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{Job: csfake.JobExpunged})
			job, _ := w.cloud.AttachVolume(context.Background(), vol, vm, nil)
			return vol, kinds.StepAttachJob, job
		}, want{status: commands.StatusCompleted, calls: 0, mapped: yes}},
		{"answer lost, CloudStack shows attached", func(w *world) (string, string, string) {
			w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{LostAnswer: true})
			return w.volume("a", ""), "", ""
		}, want{status: commands.StatusCompleted, calls: 1, mapped: yes}},
		{"attach:requested after a crash, CloudStack shows attached", func(w *world) (string, string, string) {
			vol := w.volume("a", "")
			w.attachNow(vol, vm)
			return vol, kinds.StepAttachRequested, ""
		}, want{status: commands.StatusCompleted, calls: 0, mapped: yes}},
		{"attach:requested after a crash, not attached: sent again", func(w *world) (string, string, string) {
			return w.volume("a", ""), kinds.StepAttachRequested, ""
		}, want{status: commands.StatusCompleted, calls: 1, mapped: yes}},
		{"530 twice, then attached", func(w *world) (string, string, string) {
			w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{Err: csfake.Retryable(csfake.CmdAttachVolume)},
				csfake.Fault{Err: csfake.Retryable(csfake.CmdAttachVolume)})
			return w.volume("a", ""), "", ""
		}, want{status: commands.StatusCompleted, calls: 3, mapped: yes}},
		{"final error", func(w *world) (string, string, string) {
			w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{Err: csfake.Final(csfake.CmdAttachVolume, 533, "no capacity")})
			return w.volume("a", ""), "", ""
		}, want{status: commands.StatusFailed, code: commands.CodeCloudStackError, calls: 1, mapped: no}},
		{"attached to another VM", func(w *world) (string, string, string) {
			return w.volume("a", csfake.StoppedVMID), "", ""
		}, want{status: commands.StatusFailed, code: commands.CodeConflict, calls: 0, mapped: no}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			vol, step, job := tc.setup(w)
			before := w.cloud.CallsOf(csfake.CmdAttachVolume)
			id := w.resumed(commands.OpAttach, vol, &vm, commands.AttachRequest{VolumeID: vol, VMID: vm}, step, job)
			w.check(w.run(id), csfake.CmdAttachVolume, before, tc.want)
			if tc.want.status == commands.StatusCompleted && w.cloud.Attaches(vol) != 1 {
				t.Fatalf("attaches done in CloudStack: %d, want exactly 1", w.cloud.Attaches(vol))
			}
		})
	}
}

// TestCreateResumes: a create adopts the volume a lost or interrupted
// createVolume made, and makes one only when CloudStack has none.
func TestCreateResumes(t *testing.T) {
	req := commands.CreateRequest{Name: "c", Size: 1 << 30, DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID}
	for _, tc := range []struct {
		name  string
		setup func(w *world) (vol, step, job string)
		want  want
	}{
		{"fresh", func(w *world) (string, string, string) { return "", "", "" },
			want{status: commands.StatusCompleted, msg: "Volume created successfully", calls: 1}},
		{"answer lost: adopts the volume it made", func(w *world) (string, string, string) {
			w.cloud.Script(csfake.CmdCreateVolume, csfake.Fault{LostAnswer: true})
			return "", "", ""
		}, want{status: commands.StatusCompleted, calls: 1}},
		{"create:requested after a crash, volume made: adopted", func(w *world) (string, string, string) {
			w.volume(req.Name, "")
			return "", kinds.StepCreateRequested, ""
		}, want{status: commands.StatusCompleted, calls: 0}},
		{"create:requested after a crash, nothing made: created", func(w *world) (string, string, string) {
			return "", kinds.StepCreateRequested, ""
		}, want{status: commands.StatusCompleted, calls: 1}},
		{"create:job: its job followed", func(w *world) (string, string, string) {
			vol, job, _ := w.cloud.CreateVolume(context.Background(), csapi.CreateParams{Name: req.Name, SizeGiB: 1,
				DiskOfferingID: req.DiskOfferingID, ZoneID: req.ZoneID})
			return vol, kinds.StepCreateJob, job
		}, want{status: commands.StatusCompleted, calls: 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			vol, step, job := tc.setup(w)
			before := w.cloud.CallsOf(csfake.CmdCreateVolume)
			id := w.resumed(commands.OpCreate, vol, nil, req, step, job)
			op := w.run(id)
			w.check(op, csfake.CmdCreateVolume, before, tc.want)
			vols, err := w.cloud.ListVolumes(context.Background(), csapi.ListFilter{Name: req.Name, ZoneID: req.ZoneID})
			if err != nil || len(vols) != 1 || op.VolumeID != vols[0].ID || op.Response.VolumeID != vols[0].ID {
				t.Fatalf("volumes named %s: %+v (%v); the operation names %s, want exactly one, its own", req.Name, vols, err, op.VolumeID)
			}
		})
	}
}

// TestDetachResumes: a detach follows its job, and after a lost answer
// or a crash asks CloudStack before detaching again.
func TestDetachResumes(t *testing.T) {
	vm := csfake.VMID
	for _, tc := range []struct {
		name  string
		setup func(w *world) (vol, step, job string)
		want  want
	}{
		{"fresh", func(w *world) (string, string, string) { return w.volume("d", vm), "", "" },
			want{status: commands.StatusCompleted, msg: "Volume detached successfully", calls: 1, mapped: no}},
		{"not attached", func(w *world) (string, string, string) { return w.volume("d", ""), "", "" },
			want{status: commands.StatusCompleted, msg: "Volume was not attached", calls: 0, mapped: no}},
		{"answer lost, CloudStack shows detached", func(w *world) (string, string, string) {
			w.cloud.Script(csfake.CmdDetachVolume, csfake.Fault{LostAnswer: true})
			return w.volume("d", vm), "", ""
		}, want{status: commands.StatusCompleted, calls: 1, mapped: no}},
		{"detach:requested after a crash, still attached: sent again", func(w *world) (string, string, string) {
			return w.volume("d", vm), kinds.StepDetachRequested, ""
		}, want{status: commands.StatusCompleted, calls: 1, mapped: no}},
		{"detach:job, job failed, still attached", func(w *world) (string, string, string) {
			vol := w.volume("d", vm)
			job := w.failedJob(csfake.CmdDetachVolume, func() (string, error) { return w.cloud.DetachVolume(context.Background(), vol) })
			return vol, kinds.StepDetachJob, job
		}, want{status: commands.StatusFailed, code: commands.CodeCloudStackError, calls: 0, mapped: yes}},
		{"detach:job, job pending, then done", func(w *world) (string, string, string) {
			vol := w.volume("d", vm)
			w.cloud.Script(csfake.CmdDetachVolume, csfake.Fault{Job: csfake.JobPends})
			job, _ := w.cloud.DetachVolume(context.Background(), vol)
			w.releaseWhenPolled(job)
			return vol, kinds.StepDetachJob, job
		}, want{status: commands.StatusCompleted, calls: 0, mapped: no}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			vol, step, job := tc.setup(w)
			if v, _ := w.cloud.GetVolume(context.Background(), vol); v.VMID != "" {
				if _, err := w.store.PutMapping(context.Background(), kinds.AttachedMapping(v, v.VMID)); err != nil {
					t.Fatal(err)
				}
			}
			before := w.cloud.CallsOf(csfake.CmdDetachVolume)
			id := w.resumed(commands.OpDetach, vol, nil, commands.VolumeRequest{VolumeID: vol}, step, job)
			w.check(w.run(id), csfake.CmdDetachVolume, before, tc.want)
		})
	}
}

// TestDeleteResumes: a delete whose answer was lost asks CloudStack
// whether the volume is gone instead of failing or deleting twice.
func TestDeleteResumes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(w *world) (vol, step string)
		want  want
	}{
		{"fresh", func(w *world) (string, string) { return w.volume("x", ""), "" },
			want{status: commands.StatusCompleted, msg: "Volume deleted successfully", calls: 1}},
		{"answer lost after the delete", func(w *world) (string, string) {
			w.cloud.Script(csfake.CmdDeleteVolume, csfake.Fault{LostAnswer: true})
			return w.volume("x", ""), ""
		}, want{status: commands.StatusCompleted, msg: "Volume deleted successfully", calls: 1}},
		{"answer lost, then the question fails too: asked again, never sent twice", func(w *world) (string, string) {
			w.cloud.Script(csfake.CmdDeleteVolume, csfake.Fault{LostAnswer: true})
			w.cloud.Script(csfake.CmdListVolumes, csfake.Fault{}, csfake.Fault{Err: csfake.Retryable(csfake.CmdListVolumes)})
			return w.volume("x", ""), ""
		}, want{status: commands.StatusCompleted, msg: "Volume deleted successfully", calls: 1}},
		{"delete:requested after a crash, deleted already", func(w *world) (string, string) {
			vol := w.volume("x", "")
			if err := w.cloud.DeleteVolume(context.Background(), vol); err != nil {
				t.Fatal(err)
			}
			return vol, kinds.StepDelete
		}, want{status: commands.StatusCompleted, msg: "Volume already deleted", calls: 0}},
		{"never reached CloudStack, then deleted", func(w *world) (string, string) {
			w.cloud.Script(csfake.CmdDeleteVolume, csfake.Fault{Err: csfake.Unreachable(csfake.CmdDeleteVolume)})
			return w.volume("x", ""), ""
		}, want{status: commands.StatusCompleted, calls: 2}},
		{"attached", func(w *world) (string, string) { return w.volume("x", csfake.VMID), "" },
			want{status: commands.StatusFailed, code: commands.CodeConflict, calls: 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newWorld(t)
			vol, step := tc.setup(w)
			before := w.cloud.CallsOf(csfake.CmdDeleteVolume)
			id := w.resumed(commands.OpDelete, vol, nil, commands.VolumeRequest{VolumeID: vol}, step, "")
			w.check(w.run(id), csfake.CmdDeleteVolume, before, tc.want)
			_, err := w.cloud.GetVolume(context.Background(), vol)
			if gone := errors.Is(err, csapi.ErrNotFound); gone != (tc.want.status == commands.StatusCompleted) {
				t.Fatalf("volume gone from CloudStack: %v (%v)", gone, err)
			}
		})
	}
}
