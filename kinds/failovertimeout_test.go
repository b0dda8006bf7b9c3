package kinds_test

import (
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
)

// TestFailoverStepJobLands: a failover step that timed out on a
// CloudStack job that still runs is decided by the job before anything is
// undone: the workflow waits for the job's end (at most the step
// timeout) and records it on the step's child. A job that succeeded made
// the step done, and it is undone (a snapshot's, found by its job, is
// deleted); a job that failed did nothing to undo; a job still running
// leaves the failover not compensated, left naming the step.
func TestFailoverStepJobLands(t *testing.T) {
	for _, tc := range []struct {
		name string
		// cmd's first call's job pends past the step's timeout.
		cmd string
		// end is what becomes of the job when the workflow waits for it:
		// "succeeds", "fails", or "" (it runs on).
		end         string
		step        int
		jobStatus   any
		compensated bool
		// undone is whether the timed-out step is undone.
		undone bool
	}{
		{name: "attach of the root succeeds late: undone", cmd: csfake.CmdAttachVolume, end: "succeeds", step: 4,
			jobStatus: commands.JobSucceeded, compensated: true, undone: true},
		{name: "snapshot succeeds late: deleted", cmd: csfake.CmdCreateSnapshot, end: "succeeds", step: 0,
			jobStatus: commands.JobSucceeded, compensated: true, undone: true},
		{name: "attach of the root fails late: nothing to undo", cmd: csfake.CmdAttachVolume, end: "fails", step: 4,
			jobStatus: commands.JobFailed, compensated: true},
		{name: "attach of the root still runs: not compensated", cmd: csfake.CmdAttachVolume, step: 4,
			jobStatus: nil, compensated: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFoWorldStep(t, 500*time.Millisecond)
			w.cloud.Script(tc.cmd, csfake.Fault{Job: csfake.JobPends})
			var mu sync.Mutex
			var timedOut string // the job the step's child timed out on
			w.events.set(func(op commands.Operation) {
				if op.ParentID != "" && op.Status == commands.StatusFailed && op.Details[commands.DetailJobMayRun] == true {
					mu.Lock()
					timedOut, _ = op.Details[commands.DetailJobID].(string)
					mu.Unlock()
				}
			})
			w.sent.onWait = func(jobID string) {
				mu.Lock()
				late := jobID == timedOut
				mu.Unlock()
				switch {
				case !late:
				case tc.end == "succeeds":
					_ = w.cloud.Release(jobID)
				case tc.end == "fails":
					_ = w.cloud.FailJob(jobID, nil)
				}
			}
			fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
			// Whatever still runs in CloudStack lands now.
			for _, job := range w.cloud.PendingJobs() {
				if err := w.cloud.Release(job); err != nil {
					t.Fatal(err)
				}
			}
			if fo.Status != commands.StatusFailed || fo.Details[commands.DetailCompensated] != tc.compensated {
				t.Fatalf("failover %s (%s) %v; want failed, compensated %v\n%s", fo.Status, fo.Error, fo.Details, tc.compensated, w.log.String())
			}
			child, err := w.store.GetOperation(w.ctx, fo.Workflow.Steps[tc.step].OperationID)
			w.must(err)
			if child.Details[commands.DetailJobStatus] != tc.jobStatus {
				t.Fatalf("child of step %d: details %v, want job_status %v", tc.step, child.Details, tc.jobStatus)
			}
			undone := slices.ContainsFunc(fo.Workflow.Steps, func(s commands.WorkflowStep) bool {
				return s.Undoes != nil && *s.Undoes == tc.step && s.Status == commands.StepDone
			})
			if undone != tc.undone {
				t.Fatalf("step %d undone %v, want %v: steps %+v", tc.step, undone, tc.undone, fo.Workflow.Steps)
			}
			if !tc.compensated {
				left, _ := fo.Details[commands.DetailLeft].([]any)
				if !slices.ContainsFunc(left, func(l any) bool {
					s, _ := l.(string)
					return strings.Contains(s, "step 4 (attach volume "+w.root) && strings.Contains(s, "unknown")
				}) {
					t.Fatalf("left %v does not name step 4", left)
				}
				return
			}
			for v, ro := range map[string]bool{w.root: false, w.data: true} {
				if p := w.where(v); p.vm != appliance || p.export != exportName(v) || p.ro != ro {
					t.Fatalf("volume %s: %+v, want back on the appliance exported as %s\n%s", v, p, exportName(v), w.log.String())
				}
				snaps, err := w.cloud.ListSnapshots(w.ctx, csapi.SnapshotFilter{VolumeID: v})
				w.must(err)
				for _, s := range snaps {
					if s.State == csapi.SnapshotBackedUp {
						t.Fatalf("volume %s: snapshot %s (%s) left", v, s.ID, s.State)
					}
				}
			}
		})
	}
}
