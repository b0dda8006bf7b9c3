package csfake_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
)

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// newVolume creates a 1 GiB volume on c and waits for its job.
func newVolume(t *testing.T, c *csfake.Cloud, name string) string {
	t.Helper()
	id, jobID, err := c.CreateVolume(ctxFor(t), csapi.CreateParams{Name: name, SizeGiB: 1,
		DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if _, err := c.WaitJob(ctxFor(t), jobID); err != nil {
		t.Fatalf("create job: %v", err)
	}
	return id
}

// vmOf returns the VM a volume is attached to, "" when detached.
func vmOf(t *testing.T, c *csfake.Cloud, id string) string {
	t.Helper()
	v, err := c.GetVolume(ctxFor(t), id)
	if err != nil {
		t.Fatalf("get %s: %v", id, err)
	}
	return v.VMID
}

// TestScriptedAttach runs one attach per scripted fault and checks what
// the caller sees, what CloudStack did and how many calls it took.
func TestScriptedAttach(t *testing.T) {
	final := csfake.Final(csfake.CmdAttachVolume, 431, "refused")
	jobErr := &csapi.Error{Command: csfake.CmdAttachVolume, Code: 431, Text: "Please specify a VM that is either running or stopped."}
	for _, tc := range []struct {
		name      string
		faults    []csfake.Fault
		submitErr func(error) bool // nil: no error
		waitErr   func(error) bool // nil: no error; not waited after a submit error
		attached  bool
		calls     int64 // attachVolume calls
	}{
		{"runs", nil, nil, nil, true, 1},
		{"retryable, then runs", []csfake.Fault{{Err: csfake.Retryable(csfake.CmdAttachVolume)}}, csapi.IsRetryable, nil, false, 1},
		{"final error", []csfake.Fault{{Err: final}}, func(err error) bool { return errors.Is(err, final) && !csapi.IsRetryable(err) }, nil, false, 1},
		{"unreachable", []csfake.Fault{{Err: csfake.Unreachable(csfake.CmdAttachVolume)}}, csapi.IsRetryable, nil, false, 1},
		{"lost answer", []csfake.Fault{{LostAnswer: true}}, csapi.IsMaybeDone, nil, true, 1},
		{"dropped before it ran", []csfake.Fault{{Err: csfake.Dropped(csfake.CmdAttachVolume)}}, csapi.IsMaybeDone, nil, false, 1},
		{"job fails", []csfake.Fault{{Job: csfake.JobFails}}, nil, func(err error) bool {
			var e *csapi.Error
			return errors.As(err, &e) && e.Code == 530 && !e.Retryable && !e.MaybeDone
		}, false, 1},
		{"job fails with an error", []csfake.Fault{{Job: csfake.JobFails, JobErr: jobErr}}, nil, func(err error) bool {
			var e *csapi.Error
			return errors.As(err, &e) && *e == *jobErr
		}, false, 1},
		{"job expunged after its effect", []csfake.Fault{{Job: csfake.JobExpunged}}, nil, func(err error) bool {
			return errors.Is(err, csapi.ErrNotFound)
		}, true, 1},
		{"lost answer, job pending", []csfake.Fault{{LostAnswer: true, Job: csfake.JobPends}}, csapi.IsMaybeDone, nil, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := csfake.New(csfake.Default())
			vol := newVolume(t, c, "v")
			c.Script(csfake.CmdAttachVolume, tc.faults...)
			jobID, err := c.AttachVolume(ctxFor(t), vol, csfake.VMID, nil)
			switch {
			case tc.submitErr == nil && err != nil:
				t.Fatalf("attach: %v", err)
			case tc.submitErr != nil && (err == nil || !tc.submitErr(err)):
				t.Fatalf("attach: %v (%#v)", err, err)
			case err == nil:
				_, werr := c.WaitJob(ctxFor(t), jobID)
				if (tc.waitErr == nil) != (werr == nil) || (werr != nil && !tc.waitErr(werr)) {
					t.Fatalf("wait: %v (%#v)", werr, werr)
				}
			}
			if got := vmOf(t, c, vol) == csfake.VMID; got != tc.attached {
				t.Fatalf("attached %v, want %v", got, tc.attached)
			}
			if got := c.CallsOf(csfake.CmdAttachVolume); got != tc.calls {
				t.Fatalf("%d attachVolume calls, want %d", got, tc.calls)
			}
			if got, want := c.Attaches(vol), map[bool]int64{true: 1}[tc.attached]; got != want {
				t.Fatalf("%d attaches counted, want %d", got, want)
			}
			// The script is spent: the next attach of another volume runs.
			other := newVolume(t, c, "other")
			if jobID, err := c.AttachVolume(ctxFor(t), other, csfake.VMID, nil); err != nil {
				t.Fatalf("unscripted attach: %v", err)
			} else if _, err := c.WaitJob(ctxFor(t), jobID); err != nil {
				t.Fatalf("unscripted attach job: %v", err)
			}
		})
	}
}

// TestPendingJobRelease: a pending job has no effect until Release, and
// a WaitJob blocked on it returns when it ends.
func TestPendingJobRelease(t *testing.T) {
	c := csfake.New(csfake.Default())
	vol := newVolume(t, c, "p")
	c.Script(csfake.CmdAttachVolume, csfake.Fault{Job: csfake.JobPends})
	jobID, err := c.AttachVolume(ctxFor(t), vol, csfake.VMID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if j, err := c.QueryJob(ctxFor(t), jobID); err != nil || j.Status != csapi.JobPending {
		t.Fatalf("query: %+v, %v", j, err)
	}
	if got := vmOf(t, c, vol); got != "" {
		t.Fatalf("pending job attached to %s", got)
	}
	if got := c.PendingJobs(); len(got) != 1 || got[0] != jobID {
		t.Fatalf("pending %v", got)
	}
	// A short wait ends retryable, the job still pending.
	short, cancel := context.WithTimeout(ctxFor(t), 20*time.Millisecond)
	defer cancel()
	if j, err := c.WaitJob(short, jobID); !csapi.IsRetryable(err) || j.Status != csapi.JobPending || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("short wait: %+v, %v", j, err)
	}
	done := make(chan error, 1)
	var job csapi.Job
	go func() {
		var err error
		job, err = c.WaitJob(ctxFor(t), jobID)
		done <- err
	}()
	if err := c.Release(jobID); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil || job.Status != csapi.JobSuccess || job.Volume == nil || job.Volume.VMID != csfake.VMID {
		t.Fatalf("wait: %+v, %v", job, err)
	}
	if err := c.Release(jobID); err == nil {
		t.Fatal("released a finished job")
	}
	if got := c.PendingJobs(); len(got) != 0 {
		t.Fatalf("pending %v", got)
	}
}

// TestScriptedPolls: WaitJob retries retryable poll errors and returns a
// final one, counting every poll.
func TestScriptedPolls(t *testing.T) {
	for _, tc := range []struct {
		name   string
		faults []csfake.Fault
		ok     bool
		polls  int64
	}{
		{"no fault", nil, true, 1},
		{"two retryable", []csfake.Fault{{Err: csfake.Retryable(csfake.CmdQueryJob)}, {LostAnswer: true}}, true, 3},
		{"final", []csfake.Fault{{Err: csfake.Final(csfake.CmdQueryJob, 432, "no")}}, false, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := csfake.New(csfake.Default())
			vol := newVolume(t, c, "q")
			before := c.CallsOf(csfake.CmdQueryJob)
			jobID, err := c.DetachVolume(ctxFor(t), vol)
			if err != nil {
				t.Fatal(err)
			}
			c.Script(csfake.CmdQueryJob, tc.faults...)
			_, err = c.WaitJob(ctxFor(t), jobID)
			var e *csapi.Error
			if tc.ok {
				// The volume is not attached: the job fails as CloudStack's does.
				if !errors.As(err, &e) || e.Code != 431 || e.Text != "The specified volume is not attached to a VM." {
					t.Fatalf("wait: %v", err)
				}
			} else if !errors.As(err, &e) || e.Code != 432 {
				t.Fatalf("wait: %v", err)
			}
			if got := c.CallsOf(csfake.CmdQueryJob) - before; got != tc.polls {
				t.Fatalf("%d polls, want %d", got, tc.polls)
			}
		})
	}
}

// TestStoppedVM: detaching a root disk needs a stopped VM, as in
// CloudStack; SetVMState stops it.
func TestStoppedVM(t *testing.T) {
	c := csfake.New(csfake.Default())
	ctx := ctxFor(t)
	jobID, err := c.DetachVolume(ctx, csfake.RootVolumeID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitJob(ctx, jobID); err == nil {
		t.Fatal("root disk detached from a running VM")
	}
	c.SetVMState(csfake.VMID, csfake.Stopped)
	if jobID, err = c.DetachVolume(ctx, csfake.RootVolumeID); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WaitJob(ctx, jobID); err != nil {
		t.Fatalf("root disk of a stopped VM: %v", err)
	}
	if got := vmOf(t, c, csfake.RootVolumeID); got != "" {
		t.Fatalf("attached to %s", got)
	}
}

// TestConcurrent: concurrent attaches to one VM get distinct device ids,
// and the calls are all counted (run with -race).
func TestConcurrent(t *testing.T) {
	c := csfake.New(csfake.Default())
	var vols []string
	for i := range csfake.DefaultMaxDataDisks {
		vols = append(vols, newVolume(t, c, fmt.Sprint(i)))
	}
	before := c.Calls()
	var wg sync.WaitGroup
	devs := make([]int64, len(vols))
	for i, v := range vols {
		wg.Go(func() {
			jobID, err := c.AttachVolume(ctxFor(t), v, csfake.VMID, nil)
			if err != nil {
				t.Error(err)
				return
			}
			j, err := c.WaitJob(ctxFor(t), jobID)
			if err != nil {
				t.Error(err)
				return
			}
			devs[i] = *j.Volume.DeviceID
		})
	}
	wg.Wait()
	seen := map[int64]bool{}
	for _, d := range devs {
		if d == 0 || d == 3 || seen[d] {
			t.Fatalf("device ids %v", devs)
		}
		seen[d] = true
	}
	if got := c.Calls() - before; got < 2*int64(len(vols)) {
		t.Fatalf("%d calls counted", got)
	}
}
