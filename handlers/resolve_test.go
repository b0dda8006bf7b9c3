package handlers_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/test/cloudsim"
)

// jobSide makes CloudStack's side of a timed-out operation: the volume and
// the job the operation was waiting for, left as the case wants it.
type jobSide struct {
	h  *harness
	cs *csapi.Client
}

func newJobSide(h *harness) jobSide {
	return jobSide{h: h, cs: csapi.New(csapi.Config{URL: h.sim.URL(), APIKey: h.sim.APIKey(), SecretKey: h.sim.SecretKey()})}
}

// Job faults of a case, drawn by the simulator when the job is submitted.
const (
	jobRuns     = "running"
	jobSucceeds = "succeeded"
	jobFails    = "failed"
)

// submit runs fn, which submits one job of command, under the faults that
// make it run forever, fail, or succeed, and waits for it to end unless it
// runs forever; it returns the job's id.
func (j jobSide) submit(t *testing.T, command, fate string, fn func(ctx context.Context) (string, error)) string {
	t.Helper()
	switch fate {
	case jobRuns:
		j.h.setFaults(cloudsim.Faults{JobHangRate: map[string]float64{command: 1}})
	case jobFails:
		j.h.setFaults(cloudsim.Faults{JobFailureRate: map[string]float64{command: 1}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	jobID, err := fn(ctx)
	j.h.setFaults(cloudsim.Faults{})
	if err != nil {
		t.Fatalf("%s: %v", command, err)
	}
	if fate == jobRuns {
		return jobID
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		job, err := j.cs.QueryJob(ctx, jobID)
		return err == nil && job.Status != csapi.JobPending
	}, "%s job %s ends", command, jobID)
	return jobID
}

// create submits a createVolume job.
func (j jobSide) create(t *testing.T, fate string) (volID, jobID string) {
	t.Helper()
	jobID = j.submit(t, "createVolume", fate, func(ctx context.Context) (string, error) {
		var (
			job string
			err error
		)
		volID, job, err = j.cs.CreateVolume(ctx, csapi.CreateParams{Name: "timed-out-" + uuid.NewString()[:8], SizeGiB: 1,
			DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
		return job, err
	})
	return volID, jobID
}

// attach submits an attachVolume job of a new volume to the remote VM.
func (j jobSide) attach(t *testing.T, fate string) (volID, jobID string) {
	t.Helper()
	volID = j.h.createVolume("attach-" + uuid.NewString()[:8])
	return volID, j.submit(t, "attachVolume", fate, func(ctx context.Context) (string, error) {
		return j.cs.AttachVolume(ctx, volID, cloudsim.RemoteVMID, nil)
	})
}

// detach attaches a new volume to the remote VM, records its mapping as
// the attach would have, and submits a detachVolume job.
func (j jobSide) detach(t *testing.T, fate string) (volID, jobID string) {
	t.Helper()
	volID, _ = j.attach(t, jobSucceeds)
	vol, err := j.cs.GetVolume(context.Background(), volID)
	if err != nil || vol.VMID != cloudsim.RemoteVMID {
		t.Fatalf("attached volume %s: %+v %v", volID, vol, err)
	}
	now := time.Now().UTC()
	_, err = j.h.store.PutMapping(context.Background(), commands.Mapping{ID: "mapping-" + uuid.NewString(), VolumeID: volID,
		VMID: cloudsim.RemoteVMID, CloudStackState: commands.CloudStackAttached, LinuxState: commands.LinuxNotApplicable,
		Size: vol.Size, DeviceID: vol.DeviceID, LastSync: now, CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	return volID, j.submit(t, "detachVolume", fate, func(ctx context.Context) (string, error) {
		return j.cs.DetachVolume(ctx, volID)
	})
}

// expunge has CloudStack forget a finished job.
func (j jobSide) expunge(t *testing.T, jobID string) {
	t.Helper()
	if !j.h.sim.ExpungeJob(jobID) {
		t.Fatalf("job %s not expunged", jobID)
	}
}

// timedOut records the operation as the executor leaves one whose step
// passed its deadline: failed with TIMEOUT; while waiting for a job
// (create, attach, detach), job_may_run true and the job's id. deleteVolume
// is synchronous: a delete never waits for a job.
func timedOut(t *testing.T, st state.Store, typ commands.OpType, volID, jobID string) commands.Operation {
	t.Helper()
	now := time.Now().UTC()
	op := commands.Operation{ID: "op-" + uuid.NewString(), Type: typ, Status: commands.StatusFailed, VolumeID: volID,
		Attempts: 1, CreatedAt: now.Add(-2 * time.Second), UpdatedAt: now, CompletedAt: &now, JobID: jobID}
	var req any = commands.VolumeRequest{VolumeID: volID}
	step, name := "", ""
	switch typ {
	case commands.OpCreate:
		req = commands.CreateRequest{Name: "timed-out", Size: 1 << 30, DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID}
		step, name = "create:job", "createVolume job"
	case commands.OpAttach:
		vm := cloudsim.RemoteVMID
		op.VMID = &vm
		req = commands.AttachRequest{VolumeID: volID, VMID: vm}
		step, name = "attach:job", "attachVolume job"
	case commands.OpDetach:
		vm := cloudsim.RemoteVMID
		op.VMID = &vm
		step, name = "detach:job", "detachVolume job"
	case commands.OpDelete:
		step, name = "delete:requested", "deleteVolume"
	}
	op.Request, _ = json.Marshal(req)
	op.Step = step
	op.Error = name + " did not finish within 1s: cloudstack queryAsyncJobResult: wait for job: context deadline exceeded"
	op.Details = map[string]any{"code": commands.CodeTimeout, "step": name}
	if jobID != "" {
		op.Details[commands.DetailJobMayRun], op.Details[commands.DetailJobID] = true, jobID
	}
	op, err := st.CreateOperation(context.Background(), op)
	if err != nil {
		t.Fatal(err)
	}
	return op
}

// sideEffects counts the simulator's side-effecting calls.
func sideEffects(sim *cloudsim.Sim) map[string]int64 {
	calls := sim.Stats().Calls
	out := map[string]int64{}
	for _, c := range []string{"createVolume", "attachVolume", "detachVolume", "deleteVolume"} {
		out[c] = calls[c]
	}
	return out
}

// reconcile runs one force-sync and fails the test on an error.
func (h *harness) reconcile(t *testing.T) commands.SyncResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := h.svc.Reconcile(ctx)
	if err != nil || len(res.Errors) > 0 {
		t.Fatalf("reconcile: %+v %v", res, err)
	}
	return res
}

// TestReconcileResolvesTimedOutJobs: for each operation type and what
// became of the CloudStack job it timed out on, the reconcile records the
// job's end on the operation (job_may_run false, job_status, resolved_at,
// resolution, and what the job made or why it failed), adopts what the
// job did (a create's volume, an attach's mapping, a detach's mapping
// removed, in the same sync), leaves a job still running for the next
// time, sends CloudStack nothing again, and does it once.
func TestReconcileResolvesTimedOutJobs(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	cs := newJobSide(h)
	for _, tc := range []struct {
		name string
		typ  commands.OpType
		// side makes CloudStack's side and returns the volume and job ("":
		// the operation waited for none).
		side func(t *testing.T) (volID, jobID string)
		// status is the job_status recorded; "" leaves the operation as it is.
		status string
		// volumeDetail: the details name the created volume.
		volumeDetail bool
		// errorCode is CloudStack's code of a failed job.
		errorCode int
		// mapped: the volume has a mapping afterwards.
		mapped bool
	}{
		{"create, job running", commands.OpCreate, func(t *testing.T) (string, string) { return cs.create(t, jobRuns) }, "", false, 0, false},
		{"create, job succeeded", commands.OpCreate, func(t *testing.T) (string, string) { return cs.create(t, jobSucceeds) }, commands.JobSucceeded, true, 0, false},
		{"create, job failed", commands.OpCreate, func(t *testing.T) (string, string) { return cs.create(t, jobFails) }, commands.JobFailed, true, 530, false},
		// CloudStack makes the volume before the create's job runs, and a
		// failed job leaves it: its existence does not tell.
		{"create, job unknown, volume exists", commands.OpCreate, func(t *testing.T) (string, string) {
			vol, job := cs.create(t, jobSucceeds)
			cs.expunge(t, job)
			return vol, job
		}, commands.JobUnknown, true, 0, false},
		{"create, job failed and unknown, volume exists", commands.OpCreate, func(t *testing.T) (string, string) {
			vol, job := cs.create(t, jobFails)
			cs.expunge(t, job)
			return vol, job
		}, commands.JobUnknown, true, 0, false},
		{"create, job unknown, volume gone", commands.OpCreate, func(t *testing.T) (string, string) {
			vol, job := cs.create(t, jobSucceeds)
			cs.expunge(t, job)
			if err := cs.cs.DeleteVolume(context.Background(), vol); err != nil {
				t.Fatal(err)
			}
			return vol, job
		}, commands.JobUnknown, false, 0, false},
		{"attach, job running", commands.OpAttach, func(t *testing.T) (string, string) { return cs.attach(t, jobRuns) }, "", false, 0, false},
		{"attach, job succeeded", commands.OpAttach, func(t *testing.T) (string, string) { return cs.attach(t, jobSucceeds) }, commands.JobSucceeded, false, 0, true},
		{"attach, job failed", commands.OpAttach, func(t *testing.T) (string, string) { return cs.attach(t, jobFails) }, commands.JobFailed, false, 530, false},
		{"attach, job unknown, volume attached", commands.OpAttach, func(t *testing.T) (string, string) {
			vol, job := cs.attach(t, jobSucceeds)
			cs.expunge(t, job)
			return vol, job
		}, commands.JobSucceeded, false, 0, true},
		{"attach, job unknown, volume detached since", commands.OpAttach, func(t *testing.T) (string, string) {
			vol, job := cs.attach(t, jobSucceeds)
			cs.expunge(t, job)
			cs.submit(t, "detachVolume", jobSucceeds, func(ctx context.Context) (string, error) { return cs.cs.DetachVolume(ctx, vol) })
			return vol, job
		}, commands.JobUnknown, false, 0, false},
		{"detach, job running", commands.OpDetach, func(t *testing.T) (string, string) { return cs.detach(t, jobRuns) }, "", false, 0, true},
		{"detach, job succeeded", commands.OpDetach, func(t *testing.T) (string, string) { return cs.detach(t, jobSucceeds) }, commands.JobSucceeded, false, 0, false},
		{"detach, job failed", commands.OpDetach, func(t *testing.T) (string, string) { return cs.detach(t, jobFails) }, commands.JobFailed, false, 530, true},
		{"detach, job unknown, volume detached", commands.OpDetach, func(t *testing.T) (string, string) {
			vol, job := cs.detach(t, jobSucceeds)
			cs.expunge(t, job)
			return vol, job
		}, commands.JobSucceeded, false, 0, false},
		{"detach, job unknown, volume attached", commands.OpDetach, func(t *testing.T) (string, string) {
			vol, job := cs.detach(t, jobFails)
			cs.expunge(t, job)
			return vol, job
		}, commands.JobUnknown, false, 0, true},
		// deleteVolume is synchronous: a delete that timed out had no job
		// to resolve, and is left as it is whatever CloudStack did.
		{"delete, no job, volume deleted", commands.OpDelete, func(t *testing.T) (string, string) {
			vol := h.createVolume("delete-" + uuid.NewString()[:8])
			if err := cs.cs.DeleteVolume(context.Background(), vol); err != nil {
				t.Fatal(err)
			}
			return vol, ""
		}, "", false, 0, false},
		{"delete, no job, volume kept", commands.OpDelete, func(t *testing.T) (string, string) {
			return h.createVolume("delete-" + uuid.NewString()[:8]), ""
		}, "", false, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			volID, jobID := tc.side(t)
			op := timedOut(t, h.store, tc.typ, volID, jobID)
			t.Cleanup(func() {
				if cur, err := h.store.GetOperation(ctx, op.ID); err == nil {
					_ = h.store.DeleteOperation(ctx, op.ID, cur.Revision)
				}
				_ = h.store.DeleteMapping(ctx, volID, 0)
			})
			events, err := h.nc.SubscribeSync(commands.OpSubject(op.ID))
			if err != nil {
				t.Fatal(err)
			}
			defer events.Unsubscribe()
			if err := h.nc.Flush(); err != nil { // the subscription is in place before the event
				t.Fatal(err)
			}
			before := sideEffects(h.sim)
			queries := h.sim.Stats().Calls["queryAsyncJobResult"]
			start := time.Now().UTC().Truncate(time.Second)
			res := h.reconcile(t)

			wantQueries := int64(1)
			if jobID == "" {
				wantQueries = 0
			}
			if n := h.sim.Stats().Calls["queryAsyncJobResult"] - queries; n != wantQueries {
				t.Errorf("queryAsyncJobResult called %d times, want %d", n, wantQueries)
			}
			got, err := h.store.GetOperation(ctx, op.ID)
			if err != nil {
				t.Fatal(err)
			}
			if tc.status == "" {
				if got.Revision != op.Revision || got.Details[commands.DetailJobMayRun] != op.Details[commands.DetailJobMayRun] {
					t.Fatalf("operation changed: %+v", got)
				}
				if c := testenv.Mentioning(res.Changes, op.ID); len(c) != 0 {
					t.Fatalf("changes name the untouched operation: %q", c)
				}
			} else {
				checkResolved(t, op, got, tc.status, jobID, start)
				if c := testenv.Mentioning(res.Changes, op.ID); len(c) != 1 || !strings.Contains(c[0], jobID) {
					t.Fatalf("changes %q: want one line naming operation %s and its job", res.Changes, op.ID)
				}
				msg, err := events.NextMsg(5 * time.Second)
				if err != nil {
					t.Fatalf("no event of the resolution: %v", err)
				}
				var ev commands.Operation
				if err := json.Unmarshal(msg.Data, &ev); err != nil || ev.Status != commands.StatusFailed || !ev.Resolved() ||
					ev.Details[commands.DetailJobStatus] != tc.status {
					t.Fatalf("event %s: %v", msg.Data, err)
				}
			}
			if v, ok := got.Details["volume_id"]; tc.volumeDetail != ok || (ok && v != volID) {
				t.Errorf("details volume_id %v (%v), want %s: %v", v, ok, volID, tc.volumeDetail)
			}
			if tc.errorCode != 0 {
				msg, _ := got.Details["cloudstack_message"].(string)
				if got.Details["cloudstack_error_code"] != float64(tc.errorCode) || !strings.Contains(msg, "injected job failure") {
					t.Errorf("failed job's details %v, want CloudStack's code %d and text", got.Details, tc.errorCode)
				}
			} else if _, ok := got.Details["cloudstack_error_code"]; ok {
				t.Errorf("details of a job that did not fail name an error: %v", got.Details)
			}
			checkMapping(t, h.store, volID, tc.mapped)
			if tc.mapped && tc.typ == commands.OpAttach && len(testenv.Mentioning(res.Changes, "recorded the mapping of volume "+volID)) != 1 {
				t.Errorf("changes %q do not say the mapping was recorded", res.Changes)
			}
			if tc.typ == commands.OpDetach && !tc.mapped && len(testenv.Mentioning(res.Changes, "removed mapping of volume "+volID)) != 1 {
				t.Errorf("changes %q do not say the mapping was removed", res.Changes)
			}

			// Again: nothing more to do, and CloudStack was never asked to
			// do anything.
			res = h.reconcile(t)
			if c := testenv.Mentioning(res.Changes, volID); len(c) != 0 {
				t.Fatalf("second reconcile changed %q", c)
			}
			again, err := h.store.GetOperation(ctx, op.ID)
			if err != nil || (tc.status != "" && again.Revision != got.Revision) {
				t.Fatalf("second reconcile rewrote the operation: %+v %v", again, err)
			}
			checkMapping(t, h.store, volID, tc.mapped)
			if after := sideEffects(h.sim); !maps.Equal(after, before) {
				t.Fatalf("the reconcile sent CloudStack side effects: %v, before %v", after, before)
			}
		})
	}
}

// TestReconcileResolutionLaterOperation: an attach whose job failed and
// was expunged, on a volume a later attach then attached, is not credited
// with the later one's work: its outcome is unknown, and the later
// operation is named.
func TestReconcileResolutionLaterOperation(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	cs := newJobSide(h)
	ctx := context.Background()
	volID, jobID := cs.attach(t, jobFails)
	cs.expunge(t, jobID)
	op := timedOut(t, h.store, commands.OpAttach, volID, jobID)
	cs.submit(t, "attachVolume", jobSucceeds, func(ctx context.Context) (string, error) {
		return cs.cs.AttachVolume(ctx, volID, cloudsim.RemoteVMID, nil)
	})
	now := time.Now().UTC()
	vm := cloudsim.RemoteVMID
	later, err := h.store.CreateOperation(ctx, commands.Operation{ID: "op-" + uuid.NewString(), Type: commands.OpAttach,
		Status: commands.StatusCompleted, VolumeID: volID, VMID: &vm, Request: op.Request, CreatedAt: now, UpdatedAt: now, CompletedAt: &now})
	if err != nil {
		t.Fatal(err)
	}
	h.reconcile(t)
	got, err := h.store.GetOperation(ctx, op.ID)
	if err != nil {
		t.Fatal(err)
	}
	res, _ := got.Details[commands.DetailResolution].(string)
	if got.Details[commands.DetailJobStatus] != commands.JobUnknown || !strings.Contains(res, later.ID) {
		t.Fatalf("details %v: want job_status unknown naming operation %s", got.Details, later.ID)
	}
}

// checkResolved checks the annotation of op: the same failed operation,
// its job resolved.
func checkResolved(t *testing.T, op, got commands.Operation, status, jobID string, start time.Time) {
	t.Helper()
	if got.Status != commands.StatusFailed || got.Error != op.Error || got.Step != op.Step || got.JobID != op.JobID ||
		!got.CompletedAt.Equal(*op.CompletedAt) || got.Revision == op.Revision {
		t.Fatalf("annotated operation %+v, was %+v", got, op)
	}
	d := got.Details
	if d[commands.DetailJobMayRun] != false || d[commands.DetailJobStatus] != status || d["code"] != commands.CodeTimeout ||
		d[commands.DetailJobID] != jobID {
		t.Fatalf("details %v: want job_may_run false, job_status %s, TIMEOUT and the job's id kept", d, status)
	}
	at, err := time.Parse(time.RFC3339, fmt.Sprint(d[commands.DetailResolvedAt]))
	if err != nil || at.Before(start) || at.After(time.Now().Add(time.Second)) || at.Location() != time.UTC {
		t.Fatalf("resolved_at %v: %v", d[commands.DetailResolvedAt], err)
	}
	if r, _ := d[commands.DetailResolution].(string); !strings.Contains(r, jobID) {
		t.Fatalf("resolution %q does not name the job", r)
	}
}

// checkMapping checks whether the volume has a mapping, and that one is
// the remote VM's as CloudStack attached it.
func checkMapping(t *testing.T, st state.Store, volID string, want bool) {
	t.Helper()
	m, err := st.GetMapping(context.Background(), volID)
	switch {
	case !want && !errors.Is(err, state.ErrNotFound):
		t.Fatalf("mapping of volume %s: %+v %v, want none", volID, m, err)
	case want && err != nil:
		t.Fatalf("mapping of volume %s: %v", volID, err)
	case want && (m.VMID != cloudsim.RemoteVMID || m.CloudStackState != commands.CloudStackAttached ||
		m.LinuxState != commands.LinuxNotApplicable || m.DeviceID == nil):
		t.Fatalf("mapping of volume %s: %+v", volID, m)
	}
}

// racingStore is a Store on which another writer annotates one operation
// just before this process's first write of it.
type racingStore struct {
	state.Store
	opID  string
	raced atomic.Bool
}

func (s *racingStore) UpdateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	if op.ID == s.opID && !s.raced.Swap(true) {
		cur, err := s.Store.GetOperation(ctx, op.ID)
		if err != nil {
			return op, err
		}
		cur.Details = maps.Clone(cur.Details)
		cur.Details["note"] = "written by another instance"
		if _, err := s.Store.UpdateOperation(ctx, cur); err != nil {
			return op, err
		}
	}
	return s.Store.UpdateOperation(ctx, op)
}

// TestReconcileResolutionStaleWrite: when the operation changed between
// the listing and the annotation, the annotation is refused (stale), the
// sync reports nothing for it and no error, and the next sync reads it
// again and resolves it, keeping the other writer's details.
func TestReconcileResolutionStaleWrite(t *testing.T) {
	rs := &racingStore{}
	h := newHarness(t, harnessOpts{wrap: func(st state.Store) state.Store { rs.Store = st; return rs }})
	cs := newJobSide(h)
	vol, job := cs.create(t, jobSucceeds)
	op := timedOut(t, h.store, commands.OpCreate, vol, job)
	rs.opID = op.ID

	res := h.reconcile(t)
	if c := testenv.Mentioning(res.Changes, op.ID); len(c) != 0 || !rs.raced.Load() {
		t.Fatalf("a stale annotation is reported: %q (raced %v)", c, rs.raced.Load())
	}
	got, err := h.store.GetOperation(context.Background(), op.ID)
	if err != nil || got.Details[commands.DetailJobMayRun] != true || got.Details["note"] == nil {
		t.Fatalf("after the lost race: %+v %v; want the other writer's record", got, err)
	}

	res = h.reconcile(t)
	if c := testenv.Mentioning(res.Changes, op.ID); len(c) != 1 {
		t.Fatalf("next reconcile: changes %q, want the resolution", res.Changes)
	}
	got, err = h.store.GetOperation(context.Background(), op.ID)
	if err != nil || got.Details[commands.DetailJobStatus] != commands.JobSucceeded || got.Details["note"] == nil {
		t.Fatalf("resolved after a re-read: %+v %v; want succeeded with the other writer's details", got, err)
	}
}

// TestReconcileResolvesPastThePage: the failed operations are listed page
// by page; one timed out on a job behind more than a page of other failed
// operations is resolved, and only it costs a CloudStack job query.
func TestReconcileResolvesPastThePage(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	cs := newJobSide(h)
	vol, job := cs.create(t, jobSucceeds)
	op := timedOut(t, h.store, commands.OpCreate, vol, job) // the oldest: on the last page
	ctx := context.Background()
	for i := range 230 {
		now := time.Now().UTC()
		if _, err := h.store.CreateOperation(ctx, commands.Operation{ID: fmt.Sprintf("op-%s", uuid.NewString()), Type: commands.OpDetach,
			Status: commands.StatusFailed, VolumeID: fmt.Sprintf("v-%d", i), Request: json.RawMessage(`{}`), Error: "refused",
			Details: map[string]any{"code": commands.CodeCloudStackError}, CreatedAt: now, UpdatedAt: now, CompletedAt: &now}); err != nil {
			t.Fatal(err)
		}
	}
	queries := h.sim.Stats().Calls["queryAsyncJobResult"]
	res := h.reconcile(t)
	if c := testenv.Mentioning(res.Changes, op.ID); len(c) != 1 {
		t.Fatalf("changes %q: want the resolution of %s", res.Changes, op.ID)
	}
	if n := h.sim.Stats().Calls["queryAsyncJobResult"] - queries; n != 1 {
		t.Fatalf("%d job queries for one operation that timed out on a job", n)
	}
}
