package e2e_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// testVM2ID is a second Stopped VM without a root disk, which
// failoverSim adds to the inventory: two failovers to two test VMs.
const testVM2ID = "3f2e1d0c-9b8a-4c7d-8e6f-5a4b3c2d1e0f"

// stepCommand is the CloudStack command that runs each workflow step.
var stepCommand = map[string]string{
	"snapshot": "createSnapshot", "detach": "detachVolume", "attach": "attachVolume",
	"start_vm": "startVirtualMachine", "stop_vm": "stopVirtualMachine", "revert": "revertSnapshot",
	"delete_snapshot": "deleteSnapshot",
}

// failoverSim runs the simulator without local devices and with a second
// test VM.
func failoverSim(t *testing.T, seed uint64) *cloudsim.Sim {
	t.Helper()
	inv := cloudsim.DefaultInventory()
	inv.VMs = append(inv.VMs, cloudsim.VM{ID: testVM2ID, Name: "test-failover-vm-2", ZoneID: cloudsim.ZoneID, State: "Stopped"})
	return startSim(t, cloudsim.Config{Seed: seed, Inventory: inv})
}

// in is d for a subtest: its calls fail t. Take it anew after a restart.
func (d *daemon) in(t *testing.T) *daemon {
	c := *d
	c.t = t
	return &c
}

// failover posts a failover and returns the accepted operation.
func (d *daemon) failover(req commands.FailoverRequest) commands.Operation {
	d.t.Helper()
	op := d.submit(http.MethodPost, "/failovers", req)
	if op.Type != commands.OpFailover || op.VolumeID != req.RootVolumeID || op.VMID == nil || *op.VMID != req.VMID ||
		!slices.Equal(op.VolumeIDs, req.Volumes()) {
		d.t.Fatalf("accepted failover %+v, want type failover of %v to %s", op, req.Volumes(), req.VMID)
	}
	return op
}

// rollback posts the rollback of a failover and returns the accepted
// operation.
func (d *daemon) rollback(failoverID string) commands.Operation {
	d.t.Helper()
	op := d.submit(http.MethodPost, "/failovers/"+failoverID+"/rollback", nil)
	if op.Type != commands.OpRollback {
		d.t.Fatalf("accepted rollback %+v, want type rollback", op)
	}
	return op
}

// attachTo attaches vol to vmID and waits for it.
func (d *daemon) attachTo(vol, vmID string) {
	d.t.Helper()
	d.completed(d.submit(http.MethodPost, "/volumes/"+vol+"/attach", map[string]string{"vm_id": vmID}).ID)
}

// snapshotsOf lists a volume's snapshots over REST.
func (d *daemon) snapshotsOf(vol string) []commands.Snapshot {
	d.t.Helper()
	var list []commands.Snapshot
	d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+vol+"/snapshots", nil, &list)
	return list
}

// requireNoSnapshots checks that neither volumed nor CloudStack lists a
// snapshot of vols.
func requireNoSnapshots(t *testing.T, d *daemon, cs csapi.API, vols ...string) {
	t.Helper()
	for _, v := range vols {
		if list := d.snapshotsOf(v); len(list) != 0 {
			t.Errorf("snapshots of %s left: %+v", v, list)
		}
		if list, err := cs.ListSnapshots(context.Background(), csapi.SnapshotFilter{VolumeID: v}); err != nil || len(list) != 0 {
			t.Errorf("CloudStack lists snapshots of %s: %+v %v", v, list, err)
		}
	}
}

// requireOn checks in CloudStack that root is vmID's root disk (device 0)
// and that data are attached to it, not as its root.
func requireOn(t *testing.T, cs csapi.API, vmID, root string, data ...string) {
	t.Helper()
	ctx := context.Background()
	if root != "" {
		v, err := cs.GetVolume(ctx, root)
		if err != nil || v.VMID != vmID || v.DeviceID == nil || *v.DeviceID != 0 {
			t.Fatalf("root %s: CloudStack has %+v (%v), want device 0 of %s", root, v, err, vmID)
		}
	}
	for _, id := range data {
		v, err := cs.GetVolume(ctx, id)
		if err != nil || v.VMID != vmID || v.DeviceID == nil || *v.DeviceID == 0 {
			t.Fatalf("data volume %s: CloudStack has %+v (%v), want a data disk of %s", id, v, err, vmID)
		}
	}
}

// requireVMState checks a VM's state in CloudStack.
func requireVMState(t *testing.T, cs csapi.API, vmID, want string) {
	t.Helper()
	vm, err := cs.GetVM(context.Background(), vmID)
	if err != nil || vm.State != want {
		t.Fatalf("VM %s: %+v %v, want %s", vmID, vm, err, want)
	}
}

// forward are a workflow's forward steps (not the compensating ones).
func forward(wf *commands.Workflow) []commands.WorkflowStep {
	if wf == nil {
		return nil
	}
	var out []commands.WorkflowStep
	for _, s := range wf.Steps {
		if s.Undoes == nil {
			out = append(out, s)
		}
	}
	return out
}

// stepIndex is the index in wf.Steps of the forward step name on vol ("":
// the VM's power), or with undo of the step undoing one; -1 when there is
// none.
func stepIndex(wf *commands.Workflow, name, vol string, undo bool) int {
	if wf == nil {
		return -1
	}
	for i, s := range wf.Steps {
		if (s.Undoes != nil) == undo && s.Name == name && s.VolumeID == vol {
			return i
		}
	}
	return -1
}

// planStep names a forward step: what it does, on which volume ("" for
// the VM's power).
type planStep struct{ name, vol string }

func (s planStep) String() string {
	if s.vol == "" {
		return s.name
	}
	return s.name + ":" + s.vol[:8]
}

// requirePlan checks that a completed workflow ran exactly the steps
// want, each done, in that order.
func requirePlan(t *testing.T, op commands.Operation, want []planStep) {
	t.Helper()
	var got []planStep
	for _, s := range forward(op.Workflow) {
		if s.Status != commands.StepDone || s.OperationID == "" {
			t.Errorf("%s step %+v: want done by a child operation", op.Type, s)
		}
		got = append(got, planStep{s.Name, s.VolumeID})
	}
	if !slices.Equal(got, want) {
		t.Fatalf("%s ran steps %v, want %v", op.Type, got, want)
	}
	if op.Response == nil || len(op.Response.Steps) != len(op.Workflow.Steps) {
		t.Fatalf("%s response %+v: want its %d steps", op.Type, op.Response, len(op.Workflow.Steps))
	}
}

// failoverSteps and rollbackSteps are the plans of a test failover of
// root and data with start_vm and of its rollback, the volumes on a VM
// without exports.
func failoverSteps(root, data string) []planStep {
	return []planStep{{"snapshot", root}, {"snapshot", data}, {"detach", root}, {"detach", data},
		{"attach", root}, {"attach", data}, {"start_vm", ""}}
}

func rollbackSteps(root, data string) []planStep {
	return []planStep{{"stop_vm", ""}, {"detach", root}, {"detach", data}, {"revert", root}, {"revert", data},
		{"attach", root}, {"attach", data}, {"delete_snapshot", root}, {"delete_snapshot", data}}
}

// requireCompensated checks that a workflow ended failed with every step
// it did undone, and says so in its details.
func requireCompensated(t *testing.T, op commands.Operation) {
	t.Helper()
	if op.Status != commands.StatusFailed || op.Details[commands.DetailCompensated] != true {
		t.Fatalf("%s %s: %q %v, want failed and compensated", op.Type, op.Status, op.Error, op.Details)
	}
	if steps, ok := op.Details[commands.DetailSteps].([]any); !ok || len(steps) == 0 {
		t.Fatalf("%s details %v: want the steps done and undone", op.Type, op.Details)
	}
	if op.Workflow == nil {
		t.Fatalf("%s without its workflow", op.Type)
	}
	undone := map[int]bool{}
	for _, s := range op.Workflow.Steps {
		if s.Undoes != nil && s.Status == commands.StepDone {
			undone[*s.Undoes] = true
		}
	}
	failed := 0
	for i, s := range op.Workflow.Steps {
		switch {
		case s.Undoes != nil:
		case s.Status == commands.StepFailed:
			failed++
		case (s.Status == commands.StepDone || s.Status == commands.StepUndone) && !undone[i]:
			t.Errorf("step %d %+v done and never undone", i, s)
		}
	}
	if failed != 1 {
		t.Fatalf("%d failed steps in %+v, want 1", failed, op.Workflow.Steps)
	}
}

// requireStepEvents checks that a completed workflow published every
// step: an event with step "<index>:<name>:…" for each forward step, and
// details counting the steps done of all.
func requireStepEvents(t *testing.T, d *daemon, op commands.Operation) {
	t.Helper()
	steps := forward(op.Workflow)
	seen := map[int]bool{}
	maxDone := -1.0
	for _, ev := range d.opEvents([]string{op.ID}) {
		if ev.Status != commands.StatusExecuting {
			continue
		}
		for i, s := range steps {
			if strings.HasPrefix(ev.Op.Step, fmt.Sprintf("%d:%s:", i, s.Name)) {
				seen[i] = true
			}
		}
		total, hasTotal := ev.Op.Details[commands.DetailStepsTotal].(float64)
		done, hasDone := ev.Op.Details[commands.DetailStepsDone].(float64)
		if !hasTotal || !hasDone {
			continue
		}
		if int(total) != len(steps) || done > total {
			t.Errorf("%s event details %v: want %d steps in all", op.Type, ev.Op.Details, len(steps))
		}
		maxDone = max(maxDone, done)
	}
	for i, s := range steps {
		if !seen[i] {
			t.Errorf("%s published no event of step %d (%s)", op.Type, i, s.Name)
		}
	}
	if int(maxDone) != len(steps) {
		t.Errorf("%s events counted at most %v steps done, want %d", op.Type, maxDone, len(steps))
	}
}

// writeSim writes b at the start of a volume through the simulator's data
// endpoint, as the VM it is attached to would.
func writeSim(t *testing.T, sim *cloudsim.Sim, vol string, b []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPut, sim.ControlURL()+"/volumes/"+vol+"/data?offset=0", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("write %s through the simulator: %s", vol, resp.Status)
	}
}

// readSim reads n bytes at the start of a volume through the simulator's
// data endpoint.
func readSim(t *testing.T, sim *cloudsim.Sim, vol string, n int) []byte {
	t.Helper()
	resp, err := http.Get(sim.ControlURL() + "/volumes/" + vol + "/data?offset=0&length=" + strconv.Itoa(n))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("read %s through the simulator: %s %v", vol, resp.Status, err)
	}
	return b
}

// TestFailoverData: the appliance writes pattern A to two volumes through
// their NBD exports. A failover while one has an NBD client is refused
// (409 naming it, nothing recorded, the client reading on). A test
// failover whose VM refuses to start is undone:
// both volumes are back on the appliance, exported, reading A, and no
// snapshot is left. Then a forced test failover (the reader of one export
// is cut) puts them on the test VM, which writes pattern B; the rollback brings them back to the appliance under
// the same export names, reading A, with no snapshot left. A rollback of
// either failover again is refused, naming why.
func TestFailoverData(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	cs := simAPI(sim)
	root, data := d.createVolume("failover-root", 1), d.createVolume("failover-data", 1)
	vols := []string{root, data}
	a := map[string][]byte{}
	names := map[string]string{}
	devs := map[string]int64{}
	for _, v := range vols {
		m := d.attachExported(sim, v)
		a[v], names[v] = pattern(t), m.PersistentDeviceName
		d.writeNBD(m, a[v])
		vol, err := cs.GetVolume(context.Background(), v)
		if err != nil || vol.DeviceID == nil {
			t.Fatalf("volume %s: %+v %v", v, vol, err)
		}
		devs[v] = *vol.DeviceID
	}
	// backHome checks each volume mapped on the appliance at the device it
	// had, under its export name, exported, reading A, with no snapshot.
	backHome := func(t *testing.T) {
		t.Helper()
		d := d.in(t)
		requireOn(t, cs, cloudsim.ApplianceVMID, "", vols...)
		d.requireExports(vols...)
		for _, v := range vols {
			if vol, err := cs.GetVolume(context.Background(), v); err != nil || vol.DeviceID == nil || *vol.DeviceID != devs[v] {
				t.Fatalf("volume %s: CloudStack has %+v (%v), want device %d of the appliance", v, vol, err, devs[v])
			}
			m := d.requireMapped(sim, v)
			if m.PersistentDeviceName != names[v] {
				t.Fatalf("%s exported as %s, was %s", v, m.PersistentDeviceName, names[v])
			}
			if got := d.readNBD(m, len(a[v])); !bytes.Equal(got, a[v]) {
				t.Fatalf("%s does not read pattern A over NBD", v)
			}
		}
		requireNoSnapshots(t, d, cs, vols...)
		requireVMState(t, cs, cloudsim.TestVMID, "Stopped")
	}
	req := commands.FailoverRequest{VMID: cloudsim.TestVMID, RootVolumeID: root, DataVolumeIDs: []string{data}, Test: true, StartVM: true}

	// refused requires a synchronous refusal with code, naming want, and
	// no failover recorded but those done before.
	refused := func(t *testing.T, d *daemon, path string, body any, status int, code, want string) {
		t.Helper()
		var before []commands.OperationSummary
		d.mustCall(http.StatusOK, http.MethodGet, "/operations?type=failover", nil, &before)
		var e commands.Error
		d.mustCall(status, http.MethodPost, path, body, &e)
		if e.Code != code || !strings.Contains(e.Message, want) {
			t.Fatalf("POST %s: %+v, want %s naming %s", path, e, code, want)
		}
		var after []commands.OperationSummary
		d.mustCall(http.StatusOK, http.MethodGet, "/operations?type=failover", nil, &after)
		if len(after) != len(before) {
			t.Fatalf("a refused POST %s recorded a failover: %+v", path, after)
		}
	}

	t.Run("in use", func(t *testing.T) {
		d := d.in(t)
		c := holdClient(t, d.nbdURI(names[data]), true)
		testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(data) == 1 }, "the NBD client of %s counted", data)
		refused(t, d, "/failovers", req, http.StatusConflict, commands.CodeConflict, data)
		if out := c.read(t); !strings.Contains(out, "ops/sec") {
			t.Fatalf("the NBD client after the refusal: %s", out)
		}
		c.in.Close()
		testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(data) == 0 }, "the NBD client of %s gone", data)
		backHome(t)
	})

	t.Run("start refused", func(t *testing.T) {
		d := d.in(t)
		sim.SetFaults(cloudsim.Faults{JobFailureRate: map[string]float64{"startVirtualMachine": 1}})
		op := d.wait(d.failover(req).ID)
		sim.SetFaults(cloudsim.Faults{})
		requireCompensated(t, op)
		if i := stepIndex(op.Workflow, "start_vm", "", false); i < 0 || op.Workflow.Steps[i].Status != commands.StepFailed {
			t.Fatalf("steps %+v: want start_vm failed", op.Workflow.Steps)
		}
		backHome(t)
		refused(t, d, "/failovers/"+op.ID+"/rollback", nil, http.StatusConflict, commands.CodeConflict, op.ID)
	})

	t.Run("rollback", func(t *testing.T) {
		d := d.in(t)
		// A reader of the data volume's export does not stop a forced
		// failover: it is cut.
		c := holdClient(t, d.nbdURI(names[data]), true)
		testenv.Eventually(t, 20*time.Second, func() bool { return d.clientsOf(data) == 1 }, "the NBD client of %s counted", data)
		forced := req
		forced.Force = true
		fo := d.completed(d.failover(forced).ID)
		if out := c.read(t); strings.Contains(out, "read 512/512 bytes") {
			t.Fatalf("the NBD client still reads after a forced failover: %s", out)
		}
		requireOn(t, cs, cloudsim.TestVMID, root, data)
		requireVMState(t, cs, cloudsim.TestVMID, "Running")
		d.requireExports()
		for _, v := range vols {
			var m commands.Mapping
			d.mustCall(http.StatusOK, http.MethodGet, "/volumes/"+v+"/device", nil, &m)
			if m.VMID != cloudsim.TestVMID || m.DevicePath != "" || m.PersistentDeviceName != "" {
				t.Fatalf("mapping of %s on the test VM: %+v, want no device nor name here", v, m)
			}
			before := fo.Response.Before[v]
			if before.VMID != cloudsim.ApplianceVMID || before.ExportName != names[v] || before.ExportReadOnly {
				t.Fatalf("before of %s: %+v, want the appliance and export %s", v, before, names[v])
			}
			snaps := d.snapshotsOf(v)
			if len(snaps) != 1 || snaps[0].ID != fo.Response.Snapshots[v] {
				t.Fatalf("snapshots of %s: %+v, want the failover's %s", v, snaps, fo.Response.Snapshots[v])
			}
		}
		requireStepEvents(t, d, fo)

		// The test VM writes pattern B.
		for _, v := range vols {
			b := pattern(t)
			writeSim(t, sim, v, b)
			if got := readSim(t, sim, v, len(b)); !bytes.Equal(got, b) {
				t.Fatalf("%s does not read pattern B in the simulator", v)
			}
		}

		rb := d.completed(d.rollback(fo.ID).ID)
		if rb.VolumeID != root || !slices.Equal(rb.VolumeIDs, vols) {
			t.Fatalf("rollback %+v: want the failover's volumes", rb)
		}
		backHome(t)
		requireStepEvents(t, d, rb)
		refused(t, d, "/failovers/"+fo.ID+"/rollback", nil, http.StatusConflict, commands.CodeConflict, rb.ID)
	})
}

// killPoint is where a workflow is killed: at a forward step, or at the
// step undoing it (undo).
type killPoint struct {
	planStep
	undo bool
}

// killAt runs a workflow submit starts and, when at is set, kills -9 the
// instance executing it while at's child runs its CloudStack job (slowed
// down, on top of the faults set); another instance ends it (or the
// same, restarted, when it is the only one).
func killAt(t *testing.T, ds []*daemon, sim *cloudsim.Sim, at *killPoint, submit func(d *daemon) string) commands.Operation {
	t.Helper()
	if at == nil {
		d := ds[0].in(t)
		return d.wait(submit(d))
	}
	base := sim.Faults()
	slow := base
	slow.JobDuration = map[string]cloudsim.Duration{stepCommand[at.name]: cloudsim.Duration(1500 * time.Millisecond)}
	sim.SetFaults(slow)
	d := ds[0].in(t)
	id := submit(d)
	testenv.Eventually(t, 60*time.Second, func() bool {
		var op commands.Operation
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+id, nil, &op)
		if op.Status.Terminal() {
			t.Fatalf("%s ended before step %s: %+v", id, at, op)
		}
		i := stepIndex(op.Workflow, at.name, at.vol, at.undo)
		label := fmt.Sprintf("%d:%s:%s", i, at.name, at.vol)
		if i < 0 || op.Workflow.Steps[i].OperationID == "" || op.Workflow.Steps[i].Status != commands.StepPending ||
			op.Step != label || op.Details[commands.DetailStep] != label {
			return false
		}
		var child commands.Operation
		status, body := d.call(http.MethodGet, "/operations/"+op.Workflow.Steps[i].OperationID, nil)
		return status == http.StatusOK && json.Unmarshal(body, &child) == nil && child.ParentID == id &&
			child.Status == commands.StatusExecuting && sim.Stats().PendingJobs > 0
	}, "%s at step %s with its CloudStack job running", id, at)
	runners := executedBy(ds, id)
	if len(runners) != 1 {
		t.Fatalf("%s executing on instances %v, want exactly one", id, runners)
	}
	r := runners[0]
	ds[r].kill9()
	sim.SetFaults(base)
	ds[r].restart()
	done := ds[(r+1)%len(ds)].in(t).wait(id)
	if done.Attempts < 2 {
		t.Fatalf("%s ended in attempt %d: it was not resumed after the kill", id, done.Attempts)
	}
	return done
}

// onceEach checks what CloudStack did between two stats: calls of each
// command as counted, and moves attaches and detaches of each volume.
func onceEach(t *testing.T, before, after cloudsim.Stats, calls map[string]int64, moves int64, vols ...string) {
	t.Helper()
	for c, want := range calls {
		if got := after.Calls[c] - before.Calls[c]; got != want {
			t.Errorf("%s sent %d times, want %d", c, got, want)
		}
	}
	for _, v := range vols {
		if n := after.AttachesSucceeded[v] - before.AttachesSucceeded[v]; n != moves {
			t.Errorf("%s attached %d times, want %d", v, n, moves)
		}
		if n := after.DetachesSucceeded[v] - before.DetachesSucceeded[v]; n != moves {
			t.Errorf("%s detached %d times, want %d", v, n, moves)
		}
	}
}

// failoverRound runs a test failover of root and data from the remote VM
// to the test VM and its rollback, with run (killing or not), and checks
// each did its work exactly once.
func failoverRound(t *testing.T, d *daemon, sim *cloudsim.Sim, root, data string, run func(at int, submit func(d *daemon) string) commands.Operation) {
	t.Helper()
	d = d.in(t)
	cs := simAPI(sim)
	req := commands.FailoverRequest{VMID: cloudsim.TestVMID, RootVolumeID: root, DataVolumeIDs: []string{data}, Test: true, StartVM: true}
	vols := req.Volumes()

	before := sim.Stats()
	fo := run(0, func(d *daemon) string { return d.failover(req).ID })
	after := sim.Stats()
	if fo.Status != commands.StatusCompleted {
		t.Fatalf("failover %s: %q %v", fo.Status, fo.Error, fo.Details)
	}
	requirePlan(t, fo, failoverSteps(root, data))
	onceEach(t, before, after, map[string]int64{"createSnapshot": 2, "startVirtualMachine": 1}, 1, vols...)
	requireOn(t, cs, cloudsim.TestVMID, root, data)
	requireVMState(t, cs, cloudsim.TestVMID, "Running")
	for _, v := range vols {
		if p := fo.Response.Before[v]; p.VMID != cloudsim.RemoteVMID || p.DeviceID == nil || *p.DeviceID == 0 {
			t.Errorf("before of %s: %+v, want a data disk of the remote VM", v, p)
		}
		if snaps := d.snapshotsOf(v); len(snaps) != 1 || snaps[0].ID != fo.Response.Snapshots[v] {
			t.Errorf("snapshots of %s: %+v, want the failover's one %s", v, snaps, fo.Response.Snapshots[v])
		}
	}

	before = sim.Stats()
	rb := run(1, func(d *daemon) string { return d.rollback(fo.ID).ID })
	after = sim.Stats()
	if rb.Status != commands.StatusCompleted {
		t.Fatalf("rollback %s: %q %v", rb.Status, rb.Error, rb.Details)
	}
	requirePlan(t, rb, rollbackSteps(root, data))
	onceEach(t, before, after, map[string]int64{"createSnapshot": 0, "startVirtualMachine": 0, "stopVirtualMachine": 1, "deleteSnapshot": 2}, 1, vols...)
	requireOn(t, cs, cloudsim.RemoteVMID, "", vols...)
	requireVMState(t, cs, cloudsim.TestVMID, "Stopped")
	requireNoSnapshots(t, d, cs, vols...)
}

// TestFailoverKill: two volumed on one NATS cluster. Each step of a test
// failover and of its rollback in turn, the instance executing the
// workflow is killed -9 while the step's CloudStack job runs; the other
// resumes it, and each workflow completes having done its work exactly
// once in CloudStack: one snapshot, one detach and one attach per volume,
// one start, one stop. Last, a failover whose VM refuses to start is
// killed while it undoes its steps: it ends compensated, everything back,
// once.
func TestFailoverKill(t *testing.T) {
	sim := failoverSim(t, 0)
	c := startNATSCluster(t, 3)
	ds := startInstances(t, sim, c, 2)
	root, data := ds[0].createVolume("kill-root", 1), ds[0].createVolume("kill-data", 1)
	ds[0].attachTo(root, cloudsim.RemoteVMID)
	ds[0].attachTo(data, cloudsim.RemoteVMID)
	plans := [][]planStep{failoverSteps(root, data), rollbackSteps(root, data)}
	role := map[string]string{root: "root", data: "data"}
	for i := range max(len(plans[0]), len(plans[1])) {
		// Round i kills the failover at its step i, the rollback at its.
		var at [2]*killPoint
		var name []string
		for w, plan := range plans {
			if i < len(plan) {
				at[w] = &killPoint{planStep: plan[i]}
				name = append(name, strings.TrimSuffix(fmt.Sprintf("%s_at_%s_%s", []string{"failover", "rollback"}[w], plan[i].name, role[plan[i].vol]), "_"))
			}
		}
		t.Run(strings.Join(name, "+"), func(t *testing.T) {
			failoverRound(t, ds[0], sim, root, data, func(w int, submit func(d *daemon) string) commands.Operation {
				return killAt(t, ds, sim, at[w], submit)
			})
		})
	}

	// The VM refuses to start: the failover is undone, and killed while
	// it attaches the root back.
	t.Run("compensation_at_attach_root", func(t *testing.T) {
		d := ds[0].in(t)
		cs := simAPI(sim)
		sim.SetFaults(cloudsim.Faults{JobFailureRate: map[string]float64{"startVirtualMachine": 1}})
		defer sim.SetFaults(cloudsim.Faults{})
		req := commands.FailoverRequest{VMID: cloudsim.TestVMID, RootVolumeID: root, DataVolumeIDs: []string{data}, Test: true, StartVM: true}
		before := sim.Stats()
		op := killAt(t, ds, sim, &killPoint{planStep{"attach", root}, true}, func(d *daemon) string { return d.failover(req).ID })
		requireCompensated(t, op)
		onceEach(t, before, sim.Stats(), map[string]int64{"createSnapshot": 2, "startVirtualMachine": 1, "stopVirtualMachine": 0, "deleteSnapshot": 2}, 2, root, data)
		requireOn(t, cs, cloudsim.RemoteVMID, "", root, data)
		requireVMState(t, cs, cloudsim.TestVMID, "Stopped")
		requireNoSnapshots(t, d, cs, root, data)
	})
}

// TestFailoverLostReplies: CloudStack does every call of the workflows'
// steps, but half of its answers are lost. Test failovers and their
// rollbacks complete, each with one snapshot, one detach and one attach
// per volume, one start and one stop.
func TestFailoverLostReplies(t *testing.T) {
	sim := failoverSim(t, 13)
	d := startDaemon(t, sim, daemonOpts{})
	root, data := d.createVolume("lost-root", 1), d.createVolume("lost-data", 1)
	d.attachTo(root, cloudsim.RemoteVMID)
	d.attachTo(data, cloudsim.RemoteVMID)
	lost := cloudsim.ErrorFault{Rate: 0.5, Kind: cloudsim.ErrorKindDropAfter}
	faults := cloudsim.Faults{Errors: map[string]cloudsim.ErrorFault{}}
	for _, c := range stepCommand {
		faults.Errors[c] = lost
	}
	sim.SetFaults(faults)
	for range 3 {
		failoverRound(t, d, sim, root, data, func(_ int, submit func(d *daemon) string) commands.Operation {
			return d.wait(submit(d))
		})
	}
	for _, c := range stepCommand {
		if !regexp.MustCompile(`command=` + c + `.*maybe_done=true`).MatchString(d.out.String()) {
			t.Errorf("no answer to %s was lost: the test proves nothing for it", c)
		}
	}
}

// TestFailoverHoldsLines: a snapshot of the root accepted before a
// failover runs first; a detach of its data volume sent while the
// failover runs starts only after it ended, and detaches the volume from
// where the failover put it.
func TestFailoverHoldsLines(t *testing.T) {
	sim := failoverSim(t, 0)
	d := startDaemon(t, sim, daemonOpts{})
	cs := simAPI(sim)
	root, data := d.createVolume("held-root", 1), d.createVolume("held-data", 1)
	d.attachTo(root, cloudsim.RemoteVMID)
	d.attachTo(data, cloudsim.RemoteVMID)
	sim.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"createSnapshot": cloudsim.Duration(time.Second)}})
	snap := d.submit(http.MethodPost, "/volumes/"+root+"/snapshots", nil)
	fo := d.failover(commands.FailoverRequest{VMID: cloudsim.TestVMID, RootVolumeID: root, DataVolumeIDs: []string{data}, Test: true, StartVM: true})
	testenv.Eventually(t, 30*time.Second, func() bool {
		var op commands.Operation
		d.mustCall(http.StatusOK, http.MethodGet, "/operations/"+fo.ID, nil, &op)
		return op.Status == commands.StatusExecuting && op.Workflow != nil && len(op.Workflow.Steps) > 0 && op.Workflow.Steps[0].OperationID != ""
	}, "failover %s running its first step", fo.ID)
	det := d.submit(http.MethodPost, "/volumes/"+data+"/detach", nil)
	d.completed(snap.ID)
	foDone := d.completed(fo.ID)
	detDone := d.completed(det.ID)
	sim.SetFaults(cloudsim.Faults{})

	requireRanInOrder(t, d, []string{snap.ID, fo.ID, det.ID})
	for _, ev := range d.opEvents([]string{det.ID}) {
		if ev.Status == commands.StatusExecuting && ev.Op.UpdatedAt.Before(*foDone.CompletedAt) {
			t.Fatalf("detach executing at %v, before the failover ended at %v", ev.Op.UpdatedAt, foDone.CompletedAt)
		}
	}
	if detDone.Response == nil || detDone.Response.VMID != cloudsim.TestVMID {
		t.Fatalf("detach %+v: want it from the test VM, where the failover put the volume", detDone.Response)
	}
	requireOn(t, cs, cloudsim.TestVMID, root)
	if v, err := cs.GetVolume(context.Background(), data); err != nil || v.VMID != "" {
		t.Fatalf("data volume after the detach: %+v %v", v, err)
	}
}

// TestFailoversSharingVolumes: two failovers naming the same two volumes
// in opposite orders, to two test VMs, accepted at once, do not deadlock:
// both end, one after the other, and the volumes are where the records
// say: on the VM of the later one if it completed, else (compensated)
// where the earlier one put them.
func TestFailoversSharingVolumes(t *testing.T) {
	sim := failoverSim(t, 0)
	d := startDaemon(t, sim, daemonOpts{})
	cs := simAPI(sim)
	a, b := d.createVolume("shared-a", 1), d.createVolume("shared-b", 1)
	d.attachTo(a, cloudsim.RemoteVMID)
	d.attachTo(b, cloudsim.RemoteVMID)
	sim.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"attachVolume": cloudsim.Duration(300 * time.Millisecond)}})
	reqs := []commands.FailoverRequest{
		{VMID: cloudsim.TestVMID, RootVolumeID: a, DataVolumeIDs: []string{b}, Test: true},
		{VMID: testVM2ID, RootVolumeID: b, DataVolumeIDs: []string{a}, Test: true},
	}
	ids := make([]string, len(reqs))
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Go(func() {
			status, body := d.call(http.MethodPost, "/failovers", req)
			var op commands.Operation
			if status != http.StatusCreated || json.Unmarshal(body, &op) != nil {
				t.Errorf("failover %d: %d %s", i, status, body)
			}
			ids[i] = op.ID
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	ends := map[string]commands.Operation{}
	for _, id := range ids {
		ends[id] = d.wait(id)
	}
	sim.SetFaults(cloudsim.Faults{})

	// The order they ran in is that of their first executing events.
	var order []string
	for _, ev := range d.opEvents(ids) {
		if ev.Status == commands.StatusExecuting && !slices.Contains(order, ev.ID) {
			order = append(order, ev.ID)
		}
	}
	if len(order) != 2 {
		t.Fatalf("executing events of %v: %v", ids, order)
	}
	requireRanInOrder(t, d, order)
	first, last := ends[order[0]], ends[order[1]]
	reqOf := func(op commands.Operation) commands.FailoverRequest { return reqs[indexOf(ids, op.ID)] }
	if first.Status != commands.StatusCompleted {
		t.Fatalf("the first failover %s: %q %v, want completed", first.Status, first.Error, first.Details)
	}
	where := reqOf(first)
	switch {
	case last.Status == commands.StatusCompleted:
		where = reqOf(last)
		if p := last.Response.Before[where.RootVolumeID]; p.VMID != reqOf(first).VMID {
			t.Errorf("the later failover found %s on %+v, want the earlier one's VM", where.RootVolumeID, p)
		}
	case last.Status == commands.StatusFailed:
		requireCompensated(t, last)
	default:
		t.Fatalf("the later failover ended %s", last.Status)
	}
	requireOn(t, cs, where.VMID, where.RootVolumeID, where.DataVolumeIDs...)
}

// TestFailoverKillAppliance: the appliance's own volumed (its NBD server
// and device agent) is killed -9 while a failover detaches an exported
// volume from it, and again while the rollback attaches the root back;
// restarted, it ends both, and the volumes read pattern A over NBD
// under their export names. (The resumed attach waits out the VM lease
// the killed process held: up to its 15 s TTL.)
func TestFailoverKillAppliance(t *testing.T) {
	requireNBDClients(t)
	sim := startLocalSim(t, false)
	d := startDaemon(t, sim, daemonOpts{})
	cs := simAPI(sim)
	root, data := d.createVolume("appliance-root", 1), d.createVolume("appliance-data", 1)
	vols := []string{root, data}
	a := map[string][]byte{}
	for _, v := range vols {
		m := d.attachExported(sim, v)
		a[v] = pattern(t)
		d.writeNBD(m, a[v])
	}
	req := commands.FailoverRequest{VMID: cloudsim.TestVMID, RootVolumeID: root, DataVolumeIDs: []string{data}, Test: true, StartVM: true}
	ds := []*daemon{d}
	fo := killAt(t, ds, sim, &killPoint{planStep: planStep{"detach", data}}, func(d *daemon) string { return d.failover(req).ID })
	if fo.Status != commands.StatusCompleted {
		t.Fatalf("failover %s: %q %v", fo.Status, fo.Error, fo.Details)
	}
	requireOn(t, cs, cloudsim.TestVMID, root, data)
	d.requireExports()
	rb := killAt(t, ds, sim, &killPoint{planStep: planStep{"attach", root}}, func(d *daemon) string { return d.rollback(fo.ID).ID })
	if rb.Status != commands.StatusCompleted {
		t.Fatalf("rollback %s: %q %v", rb.Status, rb.Error, rb.Details)
	}
	requireOn(t, cs, cloudsim.ApplianceVMID, "", vols...)
	d.requireExports(vols...)
	for _, v := range vols {
		if got := d.readNBD(d.requireMapped(sim, v), len(a[v])); !bytes.Equal(got, a[v]) {
			t.Fatalf("%s does not read pattern A over NBD", v)
		}
	}
	requireNoSnapshots(t, d, cs, vols...)
}
