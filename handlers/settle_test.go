package handlers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/test/cloudsim"
)

// TestReconcileSettlesPutBackWorkflows: a failover or rollback that ended
// failed and not compensated is reported until CloudStack and the export
// records show that nothing it left remains; then the reconcile records
// settled_at on it, names it once among the changes, and neither reports
// nor changes it again. Anything left (a volume elsewhere or at another
// device, an export missing, a snapshot kept, the VM running) keeps it
// reported, naming what remains. A volume deleted in CloudStack since
// holds nothing left: the operation is settled, naming it among
// volumes_gone, or reported for what remains elsewhere. In both stores.
func TestReconcileSettlesPutBackWorkflows(t *testing.T) {
	for _, redis := range []bool{false, true} {
		t.Run(map[bool]string{false: "kv", true: "redis"}[redis], func(t *testing.T) { testSettles(t, redis) })
	}
}

func testSettles(t *testing.T, redis bool) {
	const (
		onProd, onProd2, detached = "0000000d-0000-4000-8000-000000000001", "0000000d-0000-4000-8000-000000000002", "0000000d-0000-4000-8000-000000000003"
		deleted                   = "0000000d-0000-4000-8000-000000000004"
		prod, test, host          = cloudsim.RemoteVMID, cloudsim.TestVMID, cloudsim.ApplianceVMID
	)
	inv := cloudsim.DefaultInventory()
	inv.Volumes = append(inv.Volumes,
		cloudsim.DataVolume{ID: onProd, Name: "data-1", ZoneID: cloudsim.ZoneID, SizeGB: 1, VMID: prod, DeviceID: 1},
		cloudsim.DataVolume{ID: onProd2, Name: "data-2", ZoneID: cloudsim.ZoneID, SizeGB: 1, VMID: prod, DeviceID: 2},
		cloudsim.DataVolume{ID: detached, Name: "data-3", ZoneID: cloudsim.ZoneID, SizeGB: 1},
		cloudsim.DataVolume{ID: deleted, Name: "data-4", ZoneID: cloudsim.ZoneID, SizeGB: 1})
	h := newHarness(t, harnessOpts{inventory: inv, redis: redis})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cs := csapi.New(csapi.Config{URL: h.sim.URL(), APIKey: h.sim.APIKey(), SecretKey: h.sim.SecretKey()})
	snapshot := func(vol string) string {
		t.Helper()
		id, job, err := cs.CreateSnapshot(ctx, csapi.SnapshotParams{VolumeID: vol})
		if err == nil {
			_, err = cs.WaitJob(ctx, job)
		}
		if err != nil {
			t.Fatalf("snapshot of %s: %v", vol, err)
		}
		return id
	}
	gone, kept := snapshot(onProd), snapshot(onProd2)
	job, err := cs.DeleteSnapshot(ctx, gone)
	if err == nil {
		_, err = cs.WaitJob(ctx, job)
	}
	if err != nil {
		t.Fatalf("delete snapshot %s: %v", gone, err)
	}
	if err := cs.DeleteVolume(ctx, deleted); err != nil {
		t.Fatalf("delete volume %s: %v", deleted, err)
	}
	now := time.Now().UTC()
	if _, err := h.store.PutExport(ctx, commands.Export{VolumeID: onProd, VMID: host, ExportName: "exp-1", DevicePath: "/dev/disk/by-id/exp-1",
		Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now}); err != nil {
		t.Fatal(err)
	}
	dev := func(d int64) *int64 { return &d }
	root := commands.Placement{VMID: prod, DeviceID: dev(0)}
	back1 := commands.Placement{VMID: prod, DeviceID: dev(1), ExportName: "exp-1", ExportVMID: host}
	step := func(name, vol, vm, status string) commands.WorkflowStep {
		return commands.WorkflowStep{Name: name, VolumeID: vol, VMID: vm, Status: status}
	}
	started := step("start_vm", "", test, commands.StepDone)
	at := now.Add(-time.Hour)
	record := func(typ commands.OpType, status commands.OpStatus, req any, wf *commands.Workflow, details map[string]any) commands.Operation {
		t.Helper()
		raw, _ := json.Marshal(req)
		at = at.Add(time.Minute)
		vm := test
		op := commands.Operation{ID: "op-" + uuid.NewString(), Type: typ, Status: status, VolumeID: cloudsim.RemoteRootVolumeID, VMID: &vm,
			Request: raw, Workflow: wf, Details: details, CreatedAt: at, UpdatedAt: at, CompletedAt: &at}
		op, err := h.store.CreateOperation(ctx, op)
		if err != nil {
			t.Fatal(err)
		}
		return op
	}
	failed := func() map[string]any {
		return map[string]any{"code": commands.CodeCloudStackError, commands.DetailCompensated: false,
			commands.DetailLeft: []string{"something somewhere"}}
	}
	fo := record(commands.OpFailover, commands.StatusCompleted, commands.FailoverRequest{VMID: test, RootVolumeID: cloudsim.RemoteRootVolumeID, Test: true},
		&commands.Workflow{Before: map[string]commands.Placement{cloudsim.RemoteRootVolumeID: root}, Steps: []commands.WorkflowStep{started}}, nil)
	cases := []struct {
		name  string
		typ   commands.OpType
		req   any
		wf    *commands.Workflow
		still string   // what the report says remains; "" when settled
		gone  []string // volumes_gone when settled
	}{
		{name: "all put back", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf: &commands.Workflow{Before: map[string]commands.Placement{cloudsim.RemoteRootVolumeID: root, onProd: back1, detached: {}},
				Snapshots: map[string]string{onProd: gone},
				Steps:     []commands.WorkflowStep{step("snapshot", onProd, "", commands.StepDone), started, step("stop_vm", "", test, commands.StepFailed)}}},
		{name: "rollback that failed before its first step, put back", typ: commands.OpRollback, req: commands.RollbackRequest{FailoverID: fo.ID}},
		{name: "still left", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf:    &commands.Workflow{Before: map[string]commands.Placement{detached: {VMID: prod, DeviceID: dev(4)}}},
			still: "volume " + detached + " is detached"},
		{name: "partially put back", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf:    &commands.Workflow{Before: map[string]commands.Placement{onProd: {VMID: prod, DeviceID: dev(1)}, onProd2: {}}},
			still: "volume " + onProd2 + " is attached to VM " + prod},
		{name: "at another device", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf:    &commands.Workflow{Before: map[string]commands.Placement{onProd2: {VMID: prod, DeviceID: dev(5)}}},
			still: "volume " + onProd2 + " is not at device 5"},
		{name: "not exported again", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf:    &commands.Workflow{Before: map[string]commands.Placement{onProd2: {VMID: prod, DeviceID: dev(2), ExportName: "exp-2", ExportVMID: host}}},
			still: "volume " + onProd2 + " is not exported as exp-2"},
		{name: "a snapshot still present", typ: commands.OpRollback, req: commands.RollbackRequest{FailoverID: "op-" + uuid.NewString()},
			wf: &commands.Workflow{Before: map[string]commands.Placement{onProd2: {VMID: prod, DeviceID: dev(2)}},
				Snapshots: map[string]string{onProd2: kept}, Steps: []commands.WorkflowStep{step("stop_vm", "", test, commands.StepDone)}},
			still: "snapshot " + kept + " of volume " + onProd2 + " remains"},
		{name: "a volume deleted since", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf: &commands.Workflow{Before: map[string]commands.Placement{deleted: {VMID: prod, DeviceID: dev(3), ExportName: "exp-4", ExportVMID: host},
				onProd: {VMID: prod, DeviceID: dev(1)}}},
			gone: []string{deleted}},
		{name: "a volume deleted since, another still left", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf:    &commands.Workflow{Before: map[string]commands.Placement{deleted: {VMID: prod, DeviceID: dev(3)}, onProd2: {}}},
			still: "volume " + onProd2 + " is attached to VM " + prod},
		{name: "the VM left running", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf: &commands.Workflow{Before: map[string]commands.Placement{onProd2: {VMID: prod, DeviceID: dev(2)}},
				Steps: []commands.WorkflowStep{step("start_vm", "", prod, commands.StepDone)}},
			still: "VM " + prod + " is Running"},
		{name: "a start whose end is unknown, the VM running", typ: commands.OpFailover, req: commands.FailoverRequest{},
			wf: &commands.Workflow{Before: map[string]commands.Placement{onProd2: {VMID: prod, DeviceID: dev(2)}},
				Steps: []commands.WorkflowStep{step("start_vm", "", prod, commands.StepFailed)}},
			still: "VM " + prod + " is Running"},
	}
	ops := make([]commands.Operation, len(cases))
	for i, tc := range cases {
		ops[i] = record(tc.typ, commands.StatusFailed, tc.req, tc.wf, failed())
	}
	for pass := range 2 {
		res, err := h.svc.Reconcile(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for i, tc := range cases {
			id := ops[i].ID
			n := slices.IndexFunc(res.Errors, func(e string) bool { return strings.Contains(e, id) })
			changes := slices.DeleteFunc(slices.Clone(res.Changes), func(c string) bool { return !strings.Contains(c, id) })
			op, err := h.store.GetOperation(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			_, settled := op.Details[commands.DetailSettledAt]
			if op.Details[commands.DetailCompensated] != false {
				t.Errorf("pass %d, %s: compensated %v, want false kept", pass, tc.name, op.Details[commands.DetailCompensated])
			}
			if tc.still != "" {
				if n < 0 || !strings.Contains(res.Errors[n], "now: "+tc.still) || len(changes) > 0 || settled {
					t.Errorf("pass %d, %s: want reported with %q, not settled; errors %q, changes %q, details %v", pass, tc.name, tc.still, res.Errors, changes, op.Details)
				}
				continue
			}
			want := []string{string(tc.typ) + " " + id + ": what it left was put back; no longer reported"}
			if tc.gone != nil {
				want = []string{string(tc.typ) + " " + id + ": what it left was put back, but for volumes " + strings.Join(tc.gone, ", ") + ", deleted since; no longer reported"}
			}
			if got := fmt.Sprint(op.Details[commands.DetailVolumesGone]); tc.gone != nil && got != fmt.Sprint(tc.gone) {
				t.Errorf("pass %d, %s: volumes_gone %s, want %v", pass, tc.name, got, tc.gone)
			}
			if pass == 1 {
				want = nil // settled once
				if op.Revision != ops[i].Revision {
					t.Errorf("pass 1, %s: the operation was written again", tc.name)
				}
			}
			if n >= 0 || !slices.Equal(changes, want) || !settled {
				t.Errorf("pass %d, %s: want settled, changes %q; errors %q, changes %q, details %v", pass, tc.name, want, res.Errors, changes, op.Details)
			}
			ops[i] = op
		}
	}
}

// TestReconcileDoesNotSettleWhileAStepsJobMayRun: a failover that failed
// on an attach whose CloudStack job still runs (its child operation
// job_may_run) is not settled although the volume is, for now, where it
// was: the job may yet attach it. In both stores.
func TestReconcileDoesNotSettleWhileAStepsJobMayRun(t *testing.T) {
	for _, redis := range []bool{false, true} {
		t.Run(map[bool]string{false: "kv", true: "redis"}[redis], func(t *testing.T) {
			const vol = "0000000d-0000-4000-8000-000000000003"
			inv := cloudsim.DefaultInventory()
			inv.Volumes = append(inv.Volumes, cloudsim.DataVolume{ID: vol, Name: "data-3", ZoneID: cloudsim.ZoneID, SizeGB: 1})
			h := newHarness(t, harnessOpts{inventory: inv, redis: redis})
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			if err := h.sim.SetFaults(cloudsim.Faults{JobHangRate: map[string]float64{"attachVolume": 1}}); err != nil {
				t.Fatal(err)
			}
			cs := csapi.New(csapi.Config{URL: h.sim.URL(), APIKey: h.sim.APIKey(), SecretKey: h.sim.SecretKey()})
			job, err := cs.AttachVolume(ctx, vol, cloudsim.TestVMID, nil)
			if err != nil {
				t.Fatal(err)
			}
			at := time.Now().UTC().Add(-time.Minute)
			vm := cloudsim.TestVMID
			id := "op-" + uuid.NewString()
			mayRun := func() map[string]any {
				return map[string]any{"code": commands.CodeCloudStackError, commands.DetailJobMayRun: true, commands.DetailJobID: job}
			}
			attach := commands.WorkflowStep{Name: "attach", VolumeID: vol, VMID: vm, Status: commands.StepFailed, OperationID: engine.ChildID(id, 0)}
			raw, _ := json.Marshal(commands.AttachRequest{VolumeID: vol, VMID: vm})
			if _, err := h.store.CreateOperation(ctx, commands.Operation{ID: attach.OperationID, ParentID: id, Type: commands.OpAttach,
				Status: commands.StatusFailed, VolumeID: vol, VMID: &vm, Request: raw, Details: mayRun(), CreatedAt: at, UpdatedAt: at, CompletedAt: &at}); err != nil {
				t.Fatal(err)
			}
			details := map[string]any{"code": commands.CodeCloudStackError, commands.DetailCompensated: false,
				commands.DetailFailedStep: mayRun(), commands.DetailLeft: []string{"step 0 may have been done"}}
			raw, _ = json.Marshal(commands.FailoverRequest{VMID: vm, RootVolumeID: vol})
			if _, err := h.store.CreateOperation(ctx, commands.Operation{ID: id, Type: commands.OpFailover, Status: commands.StatusFailed,
				VolumeID: vol, VMID: &vm, Request: raw, Details: details, CreatedAt: at, UpdatedAt: at, CompletedAt: &at,
				Workflow: &commands.Workflow{Before: map[string]commands.Placement{vol: {}}, Steps: []commands.WorkflowStep{attach}}}); err != nil {
				t.Fatal(err)
			}
			res, err := h.svc.Reconcile(ctx)
			if err != nil {
				t.Fatal(err)
			}
			op, err := h.store.GetOperation(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if _, settled := op.Details[commands.DetailSettledAt]; settled || !slices.ContainsFunc(res.Errors, func(e string) bool { return strings.Contains(e, id) }) {
				t.Errorf("settled while the attach job %s may still run: errors %q, changes %q, details %v", job, res.Errors, res.Changes, op.Details)
			}
		})
	}
}

// missedInListing is CloudStack whose listing of every volume misses
// volume, as a listing in pages does when volumes on earlier pages are
// deleted meanwhile; asked by id, CloudStack still has it.
type missedInListing struct {
	csapi.API
	volume string
}

func (m missedInListing) ListVolumes(ctx context.Context, f csapi.ListFilter) ([]csapi.Volume, error) {
	vols, err := m.API.ListVolumes(ctx, f)
	return slices.DeleteFunc(vols, func(v csapi.Volume) bool { return v.ID == m.volume }), err
}

// TestReconcileSettlesNoVolumeMissedByAListing: a volume of a failed
// failover's before that a listing of every volume misses, but that
// CloudStack still has, is not taken for deleted: the failover stays
// reported for where that volume is, not settled with it among
// volumes_gone.
func TestReconcileSettlesNoVolumeMissedByAListing(t *testing.T) {
	const vol = "0000000d-0000-4000-8000-000000000005"
	inv := cloudsim.DefaultInventory()
	inv.Volumes = append(inv.Volumes, cloudsim.DataVolume{ID: vol, Name: "data-5", ZoneID: cloudsim.ZoneID, SizeGB: 1, VMID: cloudsim.TestVMID, DeviceID: 1})
	h := newHarness(t, harnessOpts{inventory: inv, wrapCS: func(cs csapi.API) csapi.API { return missedInListing{API: cs, volume: vol} }})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	at := time.Now().UTC().Add(-time.Hour)
	vm := cloudsim.TestVMID
	raw, _ := json.Marshal(commands.FailoverRequest{VMID: vm, RootVolumeID: cloudsim.RemoteRootVolumeID, DataVolumeIDs: []string{vol}})
	dev := int64(1)
	op, err := h.store.CreateOperation(ctx, commands.Operation{ID: "op-" + uuid.NewString(), Type: commands.OpFailover, Status: commands.StatusFailed,
		VolumeID: cloudsim.RemoteRootVolumeID, VMID: &vm, Request: raw, CreatedAt: at, UpdatedAt: at, CompletedAt: &at,
		Details:  map[string]any{"code": commands.CodeCloudStackError, commands.DetailCompensated: false, commands.DetailLeft: []string{"volume left"}},
		Workflow: &commands.Workflow{Before: map[string]commands.Placement{vol: {VMID: cloudsim.RemoteVMID, DeviceID: &dev}}}})
	if err != nil {
		t.Fatal(err)
	}
	res, err := h.svc.Reconcile(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got, err := h.store.GetOperation(ctx, op.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := "now: volume " + vol + " is attached to VM " + vm
	if _, settled := got.Details[commands.DetailSettledAt]; settled ||
		!slices.ContainsFunc(res.Errors, func(e string) bool { return strings.Contains(e, op.ID) && strings.Contains(e, want) }) {
		t.Fatalf("want reported with %q, not settled; errors %q, changes %q, details %v", want, res.Errors, res.Changes, got.Details)
	}
}
