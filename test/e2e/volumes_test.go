package e2e_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// forEachStore runs a test against the embedded store and a real Redis.
func forEachStore(t *testing.T, fn func(t *testing.T, o daemonOpts)) {
	t.Run("embedded", func(t *testing.T) { fn(t, daemonOpts{}) })
	t.Run("redis", func(t *testing.T) { fn(t, daemonOpts{redisURL: testenv.StartRedis(t).URL()}) })
}

func TestRoundTripREST(t *testing.T) {
	forEachStore(t, func(t *testing.T, o daemonOpts) {
		sim := startSim(t, cloudsim.Config{})
		d := startDaemon(t, sim, o)

		vol := d.createVolume("migration-volume-001", 5)
		var st commands.VolumeStatus
		d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &st)
		if st.State != "Allocated" || st.Size != 5<<30 || st.VMID != nil || st.LastOperation == nil ||
			st.LastOperation.Type != commands.OpCreate || st.LastOperation.Status != commands.StatusCompleted {
			t.Fatalf("status after create: %+v", st)
		}

		op := d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID})
		if op.Type != commands.OpAttach || op.VolumeID != vol || op.VMID == nil || *op.VMID != cloudsim.RemoteVMID {
			t.Fatalf("accepted attach: %+v", op)
		}
		done := d.completed(op.ID)
		if done.Response.DeviceID == nil || *done.Response.DeviceID != 1 || done.CompletedAt == nil {
			t.Fatalf("attach response: %+v", done.Response)
		}
		d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol, nil, &st)
		if st.State != "Ready" || st.VMID == nil || *st.VMID != cloudsim.RemoteVMID || st.CloudStackData == nil ||
			st.CloudStackData.DeviceID == nil || *st.CloudStackData.DeviceID != 1 {
			t.Fatalf("status after attach: %+v", st)
		}
		var m commands.Mapping
		d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/device", nil, &m)
		if m.VolumeID != vol || m.VMID != cloudsim.RemoteVMID || m.CloudStackState != commands.CloudStackAttached ||
			m.LinuxState != commands.LinuxNotApplicable {
			t.Fatalf("mapping after attach: %+v", m)
		}
		var list []commands.VolumeStatus
		d.mustCall(http.StatusOK, http.MethodGet, "/vms/"+cloudsim.RemoteVMID+"/volumes", nil, &list)
		if !containsVolume(list, vol) {
			t.Fatalf("VM volumes %+v lack %s", list, vol)
		}

		d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/detach", nil).ID)
		d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol+"/device", nil, nil)
		d.mustCall(http.StatusOK, http.MethodGet, "/vms/"+cloudsim.RemoteVMID+"/volumes", nil, &list)
		if containsVolume(list, vol) {
			t.Fatalf("VM volumes %+v still hold %s after detach", list, vol)
		}

		d.completed(d.submit(http.MethodDelete, "/volumes/"+vol, nil).ID)
		d.mustCall(http.StatusNotFound, http.MethodGet, "/volumes/"+vol, nil, nil)

		var ops []commands.OperationSummary
		d.mustCall(http.StatusOK, http.MethodGet, "/operations?volume_id="+vol, nil, &ops)
		var types []commands.OpType
		for _, o := range ops {
			types = append(types, o.Type)
		}
		if fmt.Sprint(types) != "[delete detach attach create]" {
			t.Fatalf("operations of the volume, newest first: %v", types)
		}
		if c := sim.Stats().Calls; c["attachVolume"] != 1 || c["detachVolume"] != 1 || c["deleteVolume"] != 1 || c["createVolume"] != 1 {
			t.Fatalf("CloudStack calls %v: want exactly one of each command", c)
		}
	})
}

func containsVolume(list []commands.VolumeStatus, id string) bool {
	for _, v := range list {
		if v.VolumeID == id {
			return true
		}
	}
	return false
}

func TestAttachRoot(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("root-disk", 2)

	// The remote VM is running and has a root disk: CloudStack refuses.
	failed := d.wait(d.submit(http.MethodPost, "/volumes/"+vol+"/attach-root", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)
	if failed.Status != commands.StatusFailed || failed.Details["code"] != commands.CodeCloudStackError ||
		failed.Details["cloudstack_message"] == nil {
		t.Fatalf("attach-root to a running VM: %+v", failed)
	}

	op := d.submit(http.MethodPost, "/volumes/"+vol+"/attach-root", map[string]string{"vm_id": "vm-" + cloudsim.TestVMID})
	var req commands.AttachRequest
	if err := json.Unmarshal(op.Request, &req); err != nil || !req.Root() || req.DeviceID == nil || *req.DeviceID != 0 || req.VMID != cloudsim.TestVMID {
		t.Fatalf("attach-root request %s (%v)", op.Request, err)
	}
	done := d.completed(op.ID)
	if done.Response.DeviceID == nil || *done.Response.DeviceID != 0 {
		t.Fatalf("attach-root response %+v", done.Response)
	}
	// Attaching again as root is already done: completed, no second call.
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach-root", map[string]string{"vm_id": cloudsim.TestVMID}).ID)
	if n := sim.Stats().AttachesSucceeded[vol]; n != 1 {
		t.Fatalf("attaches done in CloudStack: %d, want 1", n)
	}
}

func TestOperationErrors(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("busy", 1)
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": cloudsim.RemoteVMID}).ID)

	tests := []struct {
		name, method, path string
		body               any
		code               string
	}{
		{"delete attached", http.MethodDelete, "/volumes/" + vol, nil, commands.CodeConflict},
		{"attach to another VM", http.MethodPost, "/volumes/" + vol + "/attach", map[string]string{"vm_id": cloudsim.TestVMID}, commands.CodeConflict},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			op := d.wait(d.submit(tc.method, tc.path, tc.body).ID)
			if op.Status != commands.StatusFailed || op.Details["code"] != tc.code || op.Error == "" {
				t.Fatalf("operation %+v, want failed with %s", op, tc.code)
			}
		})
	}
	// Failures are counted in metrics.
	var m commands.Metrics
	d.mustCall(http.StatusOK, http.MethodGet, "/metrics", nil, &m)
	if m.OperationsByStatus["failed"] != 2 || m.OperationsByStatus["completed"] != 2 || m.TotalOperations != 4 ||
		m.ErrorRatePercent != 50 || m.Details.CloudStackAPICalls == 0 {
		t.Fatalf("metrics %+v", m)
	}
}

func TestConcurrentOperations(t *testing.T) {
	sim := startSim(t, cloudsim.Config{JobDuration: 200 * time.Millisecond})
	d := startDaemon(t, sim, daemonOpts{})
	const n = 50
	ids := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var op commands.Operation
			status, data := d.call(http.MethodPost, "/volumes", map[string]any{"name": fmt.Sprintf("bulk-%02d", i),
				"size": int64(1) << 30, "disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID})
			if status != http.StatusCreated || json.Unmarshal(data, &op) != nil {
				t.Errorf("create %d: %d %s", i, status, data)
				return
			}
			ids[i] = op.ID
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	start := time.Now()
	vols := map[string]bool{}
	for _, id := range ids {
		vols[d.completed(id).VolumeID] = true
	}
	if len(vols) != n || sim.Stats().Calls["createVolume"] != n {
		t.Fatalf("%d distinct volumes, %d createVolume calls; want %d", len(vols), sim.Stats().Calls["createVolume"], n)
	}
	// 50 jobs of 200 ms each ran concurrently, not one after another.
	t.Logf("50 creates finished %v after the last was accepted", time.Since(start))
}

func TestOrderingOnOneVolume(t *testing.T) {
	sim := startSim(t, cloudsim.Config{JobDuration: 100 * time.Millisecond})
	d := startDaemon(t, sim, daemonOpts{})
	vol := d.createVolume("ordered", 1)
	path := "/volumes/" + vol
	attach := map[string]string{"vm_id": cloudsim.RemoteVMID}
	// Accepted back to back; each must see the previous one's result.
	seq := []commands.Operation{
		d.submit(http.MethodPost, path+"/attach", attach),
		d.submit(http.MethodPost, path+"/detach", nil),
		d.submit(http.MethodPost, path+"/attach", attach),
		d.submit(http.MethodPost, path+"/detach", nil),
		d.submit(http.MethodDelete, path, nil),
	}
	for _, op := range seq {
		d.completed(op.ID)
	}
	// In the event stream, each operation starts executing only after the
	// one accepted before it has ended.
	var ids []string
	for _, op := range seq {
		ids = append(ids, op.ID)
	}
	events := d.opEvents(ids)
	ended := map[string]bool{}
	for _, ev := range events {
		if ev.Status == commands.StatusExecuting {
			for _, earlier := range ids[:indexOf(ids, ev.ID)] {
				if !ended[earlier] {
					t.Fatalf("%s started executing before %s ended; events %v", ev.ID, earlier, events)
				}
			}
		}
		if ev.Status.Terminal() {
			ended[ev.ID] = true
		}
	}
	if n := sim.Stats().AttachesSucceeded[vol]; n != 2 {
		t.Fatalf("attaches done: %d, want 2", n)
	}
}

func indexOf(list []string, s string) int {
	for i, v := range list {
		if v == s {
			return i
		}
	}
	return -1
}
