package csapi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

// startSim runs the CloudStack simulator (without local loop devices) for
// one test and returns it with a Client on it.
func startSim(t testing.TB, jobDuration time.Duration) (*cloudsim.Sim, *Client) {
	t.Helper()
	sim := simtest.Start(t, cloudsim.Config{JobDuration: jobDuration})
	return sim, New(Config{URL: sim.URL(), APIKey: sim.APIKey(), SecretKey: sim.SecretKey()})
}

// createVolume creates a custom-size volume and waits for its job.
func createVolume(ctx context.Context, t testing.TB, c *Client, name string, gib int64) Volume {
	t.Helper()
	id, jobID, err := c.CreateVolume(ctx, CreateParams{Name: name, SizeGiB: gib,
		DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	job, err := c.WaitJob(ctx, jobID)
	if err != nil || job.Volume == nil || job.Volume.ID != id {
		t.Fatalf("create job of %s: %+v, %v", id, job, err)
	}
	return *job.Volume
}

// attach attaches and waits, returning the job's volume and error.
func attach(ctx context.Context, t *testing.T, c *Client, volID, vmID string, deviceID *int64) (Job, error) {
	t.Helper()
	jobID, err := c.AttachVolume(ctx, volID, vmID, deviceID)
	if err != nil {
		t.Fatalf("AttachVolume: %v", err)
	}
	return c.WaitJob(ctx, jobID)
}

// TestSimVolumeLifecycle runs every call against the simulator.
func TestSimVolumeLifecycle(t *testing.T) {
	_, c := startSim(t, 20*time.Millisecond)
	ctx := ctxTimeout(t, time.Minute)
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}

	v1 := createVolume(ctx, t, c, "lifecycle-1", 2)
	if v1.ID == "" || v1.State != "Allocated" || v1.Size != 2<<30 || v1.DeviceID != nil || v1.VMID != "" || v1.ZoneID != cloudsim.ZoneID {
		t.Errorf("created volume = %s", show(v1))
	}

	vm, err := c.GetVM(ctx, cloudsim.RemoteVMID)
	if err != nil || vm.ID != cloudsim.RemoteVMID || vm.State != "Running" || vm.ZoneID != cloudsim.ZoneID {
		t.Errorf("GetVM = %+v, %v", vm, err)
	}

	// Attach without a device id: the lowest free one after the root disk.
	job, err := attach(ctx, t, c, v1.ID, cloudsim.RemoteVMID, nil)
	if err != nil || job.Volume.State != "Ready" || job.Volume.VMID != cloudsim.RemoteVMID ||
		job.Volume.DeviceID == nil || *job.Volume.DeviceID != 1 || job.Volume.Attached == "" {
		t.Fatalf("attach = %s, %v", show(job.Volume), err)
	}

	// Attach with a device id.
	v2 := createVolume(ctx, t, c, "lifecycle-2", 1)
	job, err = attach(ctx, t, c, v2.ID, cloudsim.RemoteVMID, ptr(int64(4)))
	if err != nil || job.Volume.DeviceID == nil || *job.Volume.DeviceID != 4 {
		t.Fatalf("attach at 4 = %s, %v", show(job.Volume), err)
	}

	// Root disk (device 0) on the stopped test VM.
	v3 := createVolume(ctx, t, c, "lifecycle-root", 1)
	job, err = attach(ctx, t, c, v3.ID, cloudsim.TestVMID, ptr(int64(0)))
	if err != nil || job.Volume.VMID != cloudsim.TestVMID || job.Volume.DeviceID == nil || *job.Volume.DeviceID != 0 {
		t.Fatalf("attach root = %s, %v", show(job.Volume), err)
	}
	got, err := c.GetVolume(ctx, v3.ID)
	if err != nil || got.DeviceID == nil || *got.DeviceID != 0 {
		t.Errorf("GetVolume of the root disk = %s, %v", show(got), err)
	}

	vols, err := c.ListVolumes(ctx, ListFilter{VMID: cloudsim.RemoteVMID})
	if err != nil {
		t.Fatalf("ListVolumes: %v", err)
	}
	ids := make([]string, len(vols))
	for i, v := range vols {
		ids[i] = v.ID
	}
	if !slices.Contains(ids, v1.ID) || !slices.Contains(ids, v2.ID) || slices.Contains(ids, v3.ID) {
		t.Errorf("ListVolumes(remote VM) = %v, want %s and %s, not %s", ids, v1.ID, v2.ID, v3.ID)
	}

	// Deleting an attached volume is refused in the HTTP call.
	err = c.DeleteVolume(ctx, v1.ID)
	checkError(t, err, "deleteVolume", 431, 4350, "Please specify a volume that is not attached to any VM.", false)

	// Detach, then delete.
	jobID, err := c.DetachVolume(ctx, v1.ID)
	if err != nil {
		t.Fatalf("DetachVolume: %v", err)
	}
	job, err = c.WaitJob(ctx, jobID)
	if err != nil || job.Volume.VMID != "" || job.Volume.DeviceID != nil || job.Volume.State != "Ready" {
		t.Fatalf("detach = %s, %v", show(job.Volume), err)
	}
	got, err = c.GetVolume(ctx, v1.ID)
	if err != nil || got.VMID != "" || got.DeviceID != nil || got.VMName != "" {
		t.Errorf("GetVolume after detach = %s, %v", show(got), err)
	}
	if err := c.DeleteVolume(ctx, v1.ID); err != nil {
		t.Fatalf("DeleteVolume: %v", err)
	}
	if _, err := c.GetVolume(ctx, v1.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetVolume of a deleted volume: %v, want ErrNotFound", err)
	}
}

// TestSimErrors: errors the simulator produces, classified.
func TestSimErrors(t *testing.T) {
	const unknown = "11111111-2222-4333-8444-555555555555"
	sim, c := startSim(t, 10*time.Millisecond)
	ctx := ctxTimeout(t, time.Minute)
	v := createVolume(ctx, t, c, "errors", 1)
	if _, err := attach(ctx, t, c, v.ID, cloudsim.RemoteVMID, nil); err != nil {
		t.Fatalf("attach: %v", err)
	}

	t.Run("attach job of an attached volume fails final", func(t *testing.T) {
		job, err := attach(ctx, t, c, v.ID, cloudsim.RemoteVMID, nil)
		checkError(t, err, "attachVolume", 431, 0, "Please specify a volume that is not attached to any VM.", false)
		if job.Status != JobFailure || job.Err != err {
			t.Errorf("job = %+v, want failure carrying err", job)
		}
	})
	t.Run("attach job at the CD-ROM's device id fails final with 530", func(t *testing.T) {
		v2 := createVolume(ctx, t, c, "errors-cdrom", 1)
		_, err := attach(ctx, t, c, v2.ID, cloudsim.RemoteVMID, ptr(int64(3)))
		checkError(t, err, "attachVolume", 530, 0, "deviceId should be 0,1,2,4-", false)
	})
	t.Run("unknown ids are not found", func(t *testing.T) {
		if _, err := c.GetVolume(ctx, unknown); !errors.Is(err, ErrNotFound) || IsRetryable(err) {
			t.Errorf("GetVolume(unknown) = %v, want final ErrNotFound", err)
		}
		if _, err := c.GetVM(ctx, unknown); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetVM(unknown) = %v, want ErrNotFound", err)
		}
		if _, err := c.QueryJob(ctx, unknown); !errors.Is(err, ErrNotFound) {
			t.Errorf("QueryJob(unknown) = %v, want ErrNotFound", err)
		}
		_, err := c.AttachVolume(ctx, v.ID, unknown, nil)
		checkError(t, err, "attachVolume", 431, 9999, "entity does not exist", false)
		if !errors.Is(err, ErrNotFound) {
			t.Errorf("attach to an unknown VM: %v, want ErrNotFound", err)
		}
	})
	t.Run("bad credentials", func(t *testing.T) {
		bad := New(Config{URL: sim.URL(), APIKey: sim.APIKey(), SecretKey: "wrong"})
		checkError(t, bad.Ping(ctx), "listZones", 401, 0, "unable to verify user credentials", false)
	})
	t.Run("injected faults", func(t *testing.T) {
		cases := []struct {
			kind string
			code int
		}{{cloudsim.ErrorKind530, 530}, {cloudsim.ErrorKindDrop, 0}}
		for _, tc := range cases {
			if err := sim.SetFaults(cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{"listZones": {Rate: 1, Kind: tc.kind}}}); err != nil {
				t.Fatal(err)
			}
			err := c.Ping(ctx)
			var e *Error
			if !errors.As(err, &e) || e.Code != tc.code || !e.Retryable {
				t.Errorf("fault %s: %v, want retryable code %d", tc.kind, err, tc.code)
			}
		}
		if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
			t.Fatal(err)
		}
	})
}

// TestSimJobNoticedPromptly: a finished job is seen by the first poll, and
// a running one by at most the poll in flight plus one after it ends.
func TestSimJobNoticedPromptly(t *testing.T) {
	sim, c := startSim(t, 300*time.Millisecond)
	ctx := ctxTimeout(t, time.Minute)
	_, jobID, err := c.CreateVolume(ctx, CreateParams{Name: "prompt", SizeGiB: 1,
		DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
	if err != nil {
		t.Fatal(err)
	}
	var callsAtDone atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for sim.Stats().PendingJobs > 0 && ctx.Err() == nil {
			time.Sleep(100 * time.Microsecond)
		}
		callsAtDone.Store(c.Calls())
	}()
	start := c.Calls()
	job, err := c.WaitJob(ctx, jobID)
	if err != nil || job.Status != JobSuccess {
		t.Fatalf("WaitJob = %+v, %v", job, err)
	}
	<-done
	if after := c.Calls() - callsAtDone.Load(); after > 2 {
		t.Errorf("%d polls after the job ended, want at most 2", after)
	}
	if c.Calls()-start < 2 {
		t.Errorf("%d polls for a 300 ms job, want it polled while running", c.Calls()-start)
	}

	before := c.Calls()
	if job, err := c.WaitJob(ctx, jobID); err != nil || job.Status != JobSuccess {
		t.Fatalf("WaitJob of a finished job = %+v, %v", job, err)
	}
	if n := c.Calls() - before; n != 1 {
		t.Errorf("WaitJob of a finished job made %d calls, want 1", n)
	}
	// One HTTP request per poll: no hidden retries inside cloudstack-go.
	if polls, seen := c.Calls()-1, sim.Stats().Calls["queryAsyncJobResult"]; seen != polls {
		t.Errorf("simulator saw %d queryAsyncJobResult requests for %d polls", seen, polls)
	}
}

// TestSimInventoryLists lists zones, offerings and VMs, over more than one
// page of VMs.
func TestSimInventoryLists(t *testing.T) {
	inv := cloudsim.DefaultInventory()
	for i := range listPageSize + 3 {
		inv.VMs = append(inv.VMs, cloudsim.VM{ID: fmt.Sprintf("00000000-0000-4000-8000-%012d", i), Name: fmt.Sprintf("vm-%d", i),
			ZoneID: cloudsim.ZoneID, State: "Stopped"})
	}
	sim := simtest.Start(t, cloudsim.Config{Inventory: inv, JobDuration: time.Millisecond})
	c := New(Config{URL: sim.URL(), APIKey: sim.APIKey(), SecretKey: sim.SecretKey()})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	zones, err := c.ListZones(ctx)
	if err != nil || len(zones) != 1 || zones[0].ID != cloudsim.ZoneID || zones[0].Name != "OSSEA-Zone" {
		t.Fatalf("ListZones: %+v %v", zones, err)
	}
	offs, err := c.ListDiskOfferings(ctx)
	if err != nil || !slices.ContainsFunc(offs, func(o DiskOffering) bool { return o.ID == cloudsim.CustomOfferingID }) {
		t.Fatalf("ListDiskOfferings: %+v %v", offs, err)
	}
	vms, err := c.ListVMs(ctx)
	if err != nil || len(vms) != len(inv.VMs) {
		t.Fatalf("ListVMs: %d VMs (want %d), %v", len(vms), len(inv.VMs), err)
	}
	seen := map[string]bool{}
	for _, vm := range vms {
		seen[vm.ID] = true
	}
	if len(seen) != len(inv.VMs) || !seen[cloudsim.ApplianceVMID] || !seen[inv.VMs[len(inv.VMs)-1].ID] {
		t.Fatalf("ListVMs listed %d distinct VMs", len(seen))
	}
	sim.SetFaults(cloudsim.Faults{Outage: true})
	if _, err := c.ListZones(ctx); !IsRetryable(err) {
		t.Fatalf("ListZones during an outage: %v, want a retryable error", err)
	}
}

// TestInvalidParameterText: the text the pre-checks answer is CloudStack's
// own, as the simulator gives it for an unknown zone and offering.
func TestInvalidParameterText(t *testing.T) {
	_, c := startSim(t, time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	const unknown = "00000000-0000-4000-8000-00000000abcd"
	for _, tc := range []struct {
		param string
		p     CreateParams
	}{
		{"zoneid", CreateParams{Name: "x", SizeGiB: 1, DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: unknown}},
		{"diskofferingid", CreateParams{Name: "x", SizeGiB: 1, DiskOfferingID: unknown, ZoneID: cloudsim.ZoneID}},
	} {
		_, _, err := c.CreateVolume(ctx, tc.p)
		var e *Error
		if !errors.As(err, &e) || e.Code != CodeParamError || e.Text != InvalidParameterText("createVolume", tc.param, unknown) {
			t.Fatalf("create with unknown %s: %v; want %d %q", tc.param, err, CodeParamError, InvalidParameterText("createVolume", tc.param, unknown))
		}
	}
}
