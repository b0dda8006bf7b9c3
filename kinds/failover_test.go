package kinds_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/lease"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// The VMs of a failover test: the appliance holds the replicated volumes
// (mapped and exported), the test VM is Stopped without a root disk.
const (
	appliance = csfake.VMID
	testVM    = csfake.StoppedVMID
	// thirdVM is a Stopped VM neither the appliance nor the test VM.
	thirdVM = "6a1b2c3d-0000-4000-8000-0000000000f3"
)

// hookEvents passes each operation event to a hook the test sets.
type hookEvents struct {
	mu   sync.Mutex
	hook func(commands.Operation)
}

func (h *hookEvents) set(fn func(commands.Operation)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.hook = fn
}

func (h *hookEvents) PublishOperation(_ context.Context, op commands.Operation) {
	h.mu.Lock()
	fn := h.hook
	h.mu.Unlock()
	if fn != nil {
		fn(op)
	}
}

// namedExports is host work on the store's export records whose export
// name is the volume's persistent name: an export made again has the name
// it had.
type namedExports struct {
	storeExports
	mappings state.MappingReader
}

func exportName(volumeID string) string { return "vol" + strings.ReplaceAll(volumeID, "-", "")[:12] }

func (x namedExports) ExportFor(ctx context.Context, volumeID string) (commands.Export, error) {
	m, err := x.mappings.GetMapping(ctx, volumeID)
	if err != nil {
		return commands.Export{}, commands.Conflict("volume %s is not mapped", volumeID)
	}
	now := time.Now().UTC()
	return commands.Export{VolumeID: volumeID, VMID: m.VMID, ExportName: exportName(volumeID), DevicePath: "/dev/disk/by-id/" + exportName(volumeID),
		Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now}, nil
}

func (x namedExports) PutExport(ctx context.Context, f engine.Fence, e commands.Export) error {
	if err := f.Check(ctx); err != nil {
		return err
	}
	if cur, err := x.store.GetExport(ctx, e.VolumeID); err == nil {
		e.Revision = cur.Revision
	}
	_, err := x.store.PutExport(ctx, e)
	return err
}

// sentCloud counts the mutating calls that reach CloudStack: a call made
// with its ctx already done is refused before it is sent (as the real
// client refuses it), and does not count.
type sentCloud struct {
	*csfake.Cloud
	mu   sync.Mutex
	sent map[string]int64
	// stops records the forced flag of each stop sent.
	stops []bool
	// onWait, when set, is called with the job of each WaitJob.
	onWait func(jobID string)
	// onAttach, when set, is called with each attach before it is sent.
	onAttach func(volumeID, vmID string, deviceID *int64)
}

func (c *sentCloud) count(ctx context.Context, cmd string) {
	if ctx.Err() == nil {
		c.mu.Lock()
		c.sent[cmd]++
		c.mu.Unlock()
	}
}

func (c *sentCloud) calls(cmd string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sent[cmd]
}

// WaitJob runs the hook the test set, if any, first.
func (c *sentCloud) WaitJob(ctx context.Context, jobID string) (csapi.Job, error) {
	c.mu.Lock()
	fn := c.onWait
	c.mu.Unlock()
	if fn != nil {
		fn(jobID)
	}
	return c.Cloud.WaitJob(ctx, jobID)
}

func (c *sentCloud) CreateSnapshot(ctx context.Context, p csapi.SnapshotParams) (string, string, error) {
	c.count(ctx, csfake.CmdCreateSnapshot)
	return c.Cloud.CreateSnapshot(ctx, p)
}

func (c *sentCloud) AttachVolume(ctx context.Context, volumeID, vmID string, deviceID *int64) (string, error) {
	c.count(ctx, csfake.CmdAttachVolume)
	c.mu.Lock()
	fn := c.onAttach
	c.mu.Unlock()
	if fn != nil {
		fn(volumeID, vmID, deviceID)
	}
	return c.Cloud.AttachVolume(ctx, volumeID, vmID, deviceID)
}

func (c *sentCloud) DetachVolume(ctx context.Context, volumeID string) (string, error) {
	c.count(ctx, csfake.CmdDetachVolume)
	return c.Cloud.DetachVolume(ctx, volumeID)
}

func (c *sentCloud) StartVM(ctx context.Context, vmID string) (string, error) {
	c.count(ctx, csfake.CmdStartVM)
	return c.Cloud.StartVM(ctx, vmID)
}

func (c *sentCloud) StopVM(ctx context.Context, vmID string, forced bool) (string, error) {
	c.count(ctx, csfake.CmdStopVM)
	c.mu.Lock()
	c.stops = append(c.stops, forced)
	c.mu.Unlock()
	return c.Cloud.StopVM(ctx, vmID, forced)
}

func (c *sentCloud) RevertSnapshot(ctx context.Context, snapshotID string) (string, error) {
	c.count(ctx, csfake.CmdRevertSnapshot)
	return c.Cloud.RevertSnapshot(ctx, snapshotID)
}

func (c *sentCloud) DeleteSnapshot(ctx context.Context, snapshotID string) (string, error) {
	c.count(ctx, csfake.CmdDeleteSnapshot)
	return c.Cloud.DeleteSnapshot(ctx, snapshotID)
}

// foWorld is csfake's CloudStack, a memstore and every kind, with two
// volumes on the appliance, mapped and exported (the root read-write, the
// data read-only).
type foWorld struct {
	t      *testing.T
	ctx    context.Context
	cloud  *csfake.Cloud
	sent   *sentCloud
	store  *memstore.Store
	users  *fakeUsers
	events *hookEvents
	engine *engine.Engine
	log    *lockedBuffer
	root   string
	data   string
	// devs is each volume's device id on the appliance before any failover.
	devs map[string]int64
}

func newFoWorld(t *testing.T) *foWorld {
	t.Helper()
	return newFoWorldStep(t, 5*time.Second)
}

// newFoWorldStep is newFoWorld whose steps time out after step.
func newFoWorldStep(t *testing.T, step time.Duration) *foWorld {
	t.Helper()
	cfg := csfake.Default()
	cfg.VMs = append(cfg.VMs, csfake.VM{VM: csapi.VM{ID: thirdVM, Name: "third-vm", State: csfake.Stopped, ZoneID: csfake.ZoneID}})
	w := &foWorld{t: t, ctx: context.Background(), cloud: csfake.New(cfg), store: memstore.New(),
		users: &fakeUsers{users: map[string][]commands.DeviceUser{}}, events: &hookEvents{}, log: &lockedBuffer{},
		devs: map[string]int64{}}
	w.sent = &sentCloud{Cloud: w.cloud, sent: map[string]int64{}}
	log := slog.New(slog.NewTextHandler(w.log, nil))
	writer := engine.NewMappingWriter(w.store, nil, log)
	exports := namedExports{storeExports{w.store}, w.store}
	rel := &engine.Releaser{Mappings: writer, Exports: exports, InUse: w.users, Log: log}
	w.engine = engine.New(engine.Config{Operations: w.store, Publisher: w.events, Logger: log, Jobs: w.sent,
		Timing: engine.Timing{StepTimeout: step, SettleTimeout: 50 * time.Millisecond,
			Retry: backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}}},
		kinds.All(kinds.Deps{CloudStack: w.sent, Operations: w.store, Mappings: writer, Release: rel,
			Exports: exports, Log: log, StopGrace: 50 * time.Millisecond})...)
	w.root, w.data = w.replicated(false), w.replicated(true)
	return w
}

// replicated makes a volume on the appliance, mapped and exported.
func (w *foWorld) replicated(readOnly bool) string {
	w.t.Helper()
	id, job, err := w.cloud.CreateVolume(w.ctx, csapi.CreateParams{Name: "r-" + uuid.NewString()[:8], SizeGiB: 1,
		DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	job, err = w.cloud.AttachVolume(w.ctx, id, appliance, nil)
	w.must(err)
	j, err := w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	_, err = w.store.PutMapping(w.ctx, kinds.AttachedMapping(*j.Volume, appliance))
	w.must(err)
	w.devs[id] = *j.Volume.DeviceID
	now := time.Now().UTC()
	_, err = w.store.PutExport(w.ctx, commands.Export{VolumeID: id, VMID: appliance, ExportName: exportName(id),
		DevicePath: "/dev/disk/by-id/" + exportName(id), ReadOnly: readOnly, Status: commands.ExportActive, CreatedAt: now, UpdatedAt: now})
	w.must(err)
	return id
}

func (w *foWorld) must(err error) {
	w.t.Helper()
	if err != nil {
		w.t.Fatal(err)
	}
}

// record records a pending workflow operation as acceptance would.
func (w *foWorld) record(typ commands.OpType, req any, vm string) string {
	w.t.Helper()
	raw, _ := json.Marshal(req)
	now := time.Now().UTC()
	op, err := w.store.CreateOperation(w.ctx, commands.Operation{ID: "op-" + uuid.NewString(), Type: typ, Status: commands.StatusPending,
		VolumeID: w.root, VMID: &vm, VolumeIDs: []string{w.root, w.data}, Request: raw, RequestedBy: "nats:operator",
		CreatedAt: now, UpdatedAt: now})
	w.must(err)
	return op.ID
}

func (w *foWorld) failoverReq() commands.FailoverRequest {
	return commands.FailoverRequest{VMID: testVM, RootVolumeID: w.root, DataVolumeIDs: []string{w.data}, Test: true, StartVM: true}
}

// run runs an operation as a new executor would (a new claim) and
// returns how it left it.
func (w *foWorld) run(ctx context.Context, id string) (engine.Result, commands.Operation) {
	w.t.Helper()
	res := w.engine.Run(ctx, id, slog.New(slog.NewTextHandler(w.log, nil)))
	op, err := w.store.GetOperation(w.ctx, id)
	w.must(err)
	return res, op
}

// finish runs an operation to its end.
func (w *foWorld) finish(id string) commands.Operation {
	w.t.Helper()
	res, op := w.run(w.ctx, id)
	if res != engine.Done {
		w.t.Fatalf("run of %s: %v\n%s", id, res, w.log.String())
	}
	return op
}

// placement is where a volume is: its VM and device, its export.
type placement struct {
	vm     string
	dev    int64
	export string
	ro     bool
}

func (w *foWorld) where(v string) placement {
	w.t.Helper()
	vol, err := w.cloud.GetVolume(w.ctx, v)
	w.must(err)
	p := placement{vm: vol.VMID, dev: -1}
	if vol.DeviceID != nil {
		p.dev = *vol.DeviceID
	}
	if e, err := w.store.GetExport(w.ctx, v); err == nil {
		p.export, p.ro = e.ExportName, e.ReadOnly
	}
	return p
}

// snapshots counts the volume's snapshots in CloudStack.
func (w *foWorld) snapshots(v string) int {
	w.t.Helper()
	s, err := w.cloud.ListSnapshots(w.ctx, csapi.SnapshotFilter{VolumeID: v})
	w.must(err)
	return len(s)
}

func (w *foWorld) vmState(vm string) string {
	w.t.Helper()
	v, err := w.cloud.GetVM(w.ctx, vm)
	w.must(err)
	return v.State
}

// counts are CloudStack's effects, per volume where it matters, and the
// mutating calls sent.
type counts struct {
	attaches, detaches map[string]int64
	calls              map[string]int64
}

var countedCalls = []string{csfake.CmdCreateSnapshot, csfake.CmdAttachVolume, csfake.CmdDetachVolume, csfake.CmdStartVM,
	csfake.CmdStopVM, csfake.CmdRevertSnapshot, csfake.CmdDeleteSnapshot}

func (w *foWorld) counts() counts {
	c := counts{attaches: map[string]int64{}, detaches: map[string]int64{}, calls: map[string]int64{}}
	for _, v := range []string{w.root, w.data} {
		c.attaches[v], c.detaches[v] = w.cloud.Attaches(v), w.cloud.Detaches(v)
	}
	for _, cmd := range countedCalls {
		c.calls[cmd] = w.sent.calls(cmd)
	}
	return c
}

// since is what happened in CloudStack since c: effects per volume and
// calls per command.
func (w *foWorld) since(c counts) counts {
	now := w.counts()
	for k := range now.attaches {
		now.attaches[k] -= c.attaches[k]
		now.detaches[k] -= c.detaches[k]
	}
	for k := range now.calls {
		now.calls[k] -= c.calls[k]
	}
	return now
}

// wantFailedOver checks the volumes are on the test VM (root as device
// 0), their exports ended, one snapshot each, and the VM Running.
func (w *foWorld) wantFailedOver(op commands.Operation) {
	w.t.Helper()
	if op.Status != commands.StatusCompleted {
		w.t.Fatalf("failover %s: %s %v\n%s", op.Status, op.Error, op.Details, w.log.String())
	}
	if p := w.where(w.root); p.vm != testVM || p.dev != 0 || p.export != "" {
		w.t.Fatalf("root after the failover: %+v", p)
	}
	if p := w.where(w.data); p.vm != testVM || p.dev == 0 || p.export != "" {
		w.t.Fatalf("data volume after the failover: %+v", p)
	}
	r := op.Response
	if r == nil || r.VMID != testVM || r.VolumeID != w.root || len(r.Snapshots) != 2 || len(r.Before) != 2 || len(r.Steps) != 7 {
		w.t.Fatalf("failover response: %+v", r)
	}
	for _, v := range []string{w.root, w.data} {
		if n := w.snapshots(v); n != 1 {
			w.t.Fatalf("volume %s has %d snapshots, want 1", v, n)
		}
		if b := r.Before[v]; b.VMID != appliance || b.ExportName != exportName(v) || b.DeviceID == nil {
			w.t.Fatalf("before of %s: %+v", v, b)
		}
	}
	if !r.Before[w.data].ExportReadOnly || r.Before[w.root].ExportReadOnly {
		w.t.Fatalf("before: export read-only not recorded: %+v", r.Before)
	}
	if s := w.vmState(testVM); s != kinds.VMRunning {
		w.t.Fatalf("test VM %s, want Running", s)
	}
}

// wantBack checks the volumes are back on the appliance at the devices
// they had, exported as before, with no snapshot left, and the test VM
// Stopped.
func (w *foWorld) wantBack() {
	w.t.Helper()
	for v, ro := range map[string]bool{w.root: false, w.data: true} {
		if p := w.where(v); p.vm != appliance || p.dev != w.devs[v] || p.export != exportName(v) || p.ro != ro {
			w.t.Fatalf("volume %s: %+v, want back on the appliance at device %d exported as %s (read-only %v)", v, p, w.devs[v], exportName(v), ro)
		}
		if n := w.snapshots(v); n != 0 {
			w.t.Fatalf("volume %s has %d snapshots left", v, n)
		}
		if m, err := w.store.GetMapping(w.ctx, v); err != nil || m.VMID != appliance {
			w.t.Fatalf("mapping of %s: %+v (%v)", v, m, err)
		}
	}
	if s := w.vmState(testVM); s != kinds.VMStopped {
		w.t.Fatalf("test VM %s, want Stopped", s)
	}
}

// wantOnce checks each CloudStack effect happened exactly once per
// volume: attaches and detaches as given, and the calls named.
func (w *foWorld) wantOnce(got counts, attaches, detaches int64, calls map[string]int64) {
	w.t.Helper()
	for _, v := range []string{w.root, w.data} {
		if got.attaches[v] != attaches || got.detaches[v] != detaches {
			w.t.Fatalf("volume %s: %d attaches, %d detaches in CloudStack; want %d and %d", v, got.attaches[v], got.detaches[v], attaches, detaches)
		}
	}
	for cmd, n := range calls {
		if got.calls[cmd] != n {
			w.t.Fatalf("%s calls: %d, want %d (all: %v)", cmd, got.calls[cmd], n, got.calls)
		}
	}
}

// failoverCalls are a test failover's calls of two volumes.
var failoverCalls = map[string]int64{csfake.CmdCreateSnapshot: 2, csfake.CmdDetachVolume: 2, csfake.CmdAttachVolume: 2,
	csfake.CmdStartVM: 1, csfake.CmdStopVM: 0, csfake.CmdDeleteSnapshot: 0}

// rollbackCalls are a rollback's calls of two volumes.
var rollbackCalls = map[string]int64{csfake.CmdStopVM: 1, csfake.CmdDetachVolume: 2, csfake.CmdRevertSnapshot: 2,
	csfake.CmdAttachVolume: 2, csfake.CmdDeleteSnapshot: 2, csfake.CmdStartVM: 0, csfake.CmdCreateSnapshot: 0}

// TestFailoverAndRollback: a test failover moves both volumes onto the
// test VM (snapshots, exports ended, root as device 0, VM started), each
// step a child operation of the workflow; its rollback puts them back
// where they were, exported under the same names, with no snapshot left.
func TestFailoverAndRollback(t *testing.T) {
	w := newFoWorld(t)
	before := w.counts()
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	w.wantFailedOver(fo)
	w.wantOnce(w.since(before), 1, 1, failoverCalls)
	var names []string
	for i, s := range fo.Workflow.Steps {
		names = append(names, s.Name+":"+s.Status)
		child, err := w.store.GetOperation(w.ctx, s.OperationID)
		if err != nil || child.ParentID != fo.ID || child.RequestedBy != "nats:operator" || child.Status != commands.StatusCompleted ||
			s.OperationID != engine.ChildID(fo.ID, i) {
			t.Fatalf("child of step %d: %+v (%v)", i, child, err)
		}
	}
	if want := []string{"snapshot:done", "snapshot:done", "detach:done", "detach:done", "attach:done", "attach:done", "start_vm:done"}; !slices.Equal(names, want) {
		t.Fatalf("steps %v, want %v", names, want)
	}

	before = w.counts()
	rb := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusCompleted || rb.Response == nil || len(rb.Response.Steps) != 11 {
		t.Fatalf("rollback: %s %v %+v", rb.Status, rb.Details, rb.Response)
	}
	w.wantBack()
	w.wantOnce(w.since(before), 1, 1, rollbackCalls)
}

// killPoint is where an executor dies in a workflow's step: right after
// it recorded the step pending, once the step's child recorded its
// CloudStack job, or once the child ended.
type killPoint int

const (
	atPending killPoint = iota
	atJob
	atEnded
)

func (k killPoint) String() string { return [...]string{"pending", "job", "ended"}[k] }

// killAt returns a hook that cancels the executor at step n of the
// workflow id, at point k.
func killAt(id string, n int, k killPoint, cancel context.CancelFunc) func(commands.Operation) {
	child := engine.ChildID(id, n)
	var once sync.Once
	return func(op commands.Operation) {
		hit := false
		switch k {
		case atPending:
			hit = op.ID == id && op.Workflow != nil && n < len(op.Workflow.Steps) &&
				op.Workflow.Steps[n].Status == commands.StepPending && op.Workflow.Steps[n].OperationID != ""
		case atJob:
			hit = op.ID == child && op.JobID != ""
		case atEnded:
			hit = op.ID == child && op.Status.Terminal()
		}
		if hit {
			once.Do(cancel)
		}
	}
}

// killedAndResumed runs the workflow id with its executor killed at step
// n, point k, then runs it again on a new claim to its end.
func (w *foWorld) killedAndResumed(id string, n int, k killPoint) commands.Operation {
	w.t.Helper()
	ctx, cancel := context.WithCancel(w.ctx)
	defer cancel()
	w.events.set(killAt(id, n, k, cancel))
	res, op := w.run(ctx, id)
	w.events.set(nil)
	if res == engine.Done && k == atJob {
		return op // the point never came (a step without a job)
	}
	if res != engine.Stopped || op.Status.Terminal() {
		w.t.Fatalf("killed executor: %v, operation %s", res, op.Status)
	}
	return w.finish(id)
}

// TestFailoverKilledAtEachStep: an executor killed at each step of a
// failover, then of its rollback (before the step, inside it, after it),
// is resumed by a new one: each completes, each CloudStack effect once.
func TestFailoverKilledAtEachStep(t *testing.T) {
	for n := range 7 {
		for _, k := range []killPoint{atPending, atJob, atEnded} {
			t.Run(fmt.Sprintf("failover step %d %s", n, k), func(t *testing.T) {
				w := newFoWorld(t)
				before := w.counts()
				fo := w.killedAndResumed(w.record(commands.OpFailover, w.failoverReq(), testVM), n, k)
				w.wantFailedOver(fo)
				w.wantOnce(w.since(before), 1, 1, failoverCalls)
			})
		}
	}
	for n := range 11 {
		for _, k := range []killPoint{atPending, atJob, atEnded} {
			t.Run(fmt.Sprintf("rollback step %d %s", n, k), func(t *testing.T) {
				w := newFoWorld(t)
				fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
				w.wantFailedOver(fo)
				before := w.counts()
				rb := w.killedAndResumed(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM), n, k)
				if rb.Status != commands.StatusCompleted {
					t.Fatalf("rollback %s: %s %v", rb.Status, rb.Error, rb.Details)
				}
				w.wantBack()
				w.wantOnce(w.since(before), 1, 1, rollbackCalls)
			})
		}
	}
}

// TestFailoverLostAnswers: the answer of each mutating call is lost once
// after its effect; the workflows ask CloudStack and complete, each effect
// exactly once.
func TestFailoverLostAnswers(t *testing.T) {
	lost := csfake.Fault{LostAnswer: true}
	t.Run("failover", func(t *testing.T) {
		w := newFoWorld(t)
		for _, cmd := range []string{csfake.CmdCreateSnapshot, csfake.CmdDetachVolume, csfake.CmdAttachVolume, csfake.CmdStartVM} {
			w.cloud.Script(cmd, lost, lost)
		}
		before := w.counts()
		fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
		w.wantFailedOver(fo)
		w.wantOnce(w.since(before), 1, 1, failoverCalls)
	})
	t.Run("rollback", func(t *testing.T) {
		w := newFoWorld(t)
		fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
		for _, cmd := range []string{csfake.CmdStopVM, csfake.CmdDetachVolume, csfake.CmdAttachVolume, csfake.CmdDeleteSnapshot} {
			w.cloud.Script(cmd, lost, lost)
		}
		before := w.counts()
		rb := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
		if rb.Status != commands.StatusCompleted {
			t.Fatalf("rollback %s: %s %v", rb.Status, rb.Error, rb.Details)
		}
		w.wantBack()
		w.wantOnce(w.since(before), 1, 1, rollbackCalls)
	})
}

// TestFailoverCompensates: a step that fails for good undoes what was
// done: the volumes go back to the appliance, exported as before, the
// snapshots are deleted; details say compensated and list the steps. An
// undo that cannot finish ends not compensated, saying what is left where.
func TestFailoverCompensates(t *testing.T) {
	refused := csfake.Fault{Job: csfake.JobFails, JobErr: &csapi.Error{Command: csfake.CmdStartVM, Code: 533,
		Text: "Unable to create a deployment for VM"}}
	t.Run("start refused", func(t *testing.T) {
		w := newFoWorld(t)
		w.cloud.Script(csfake.CmdStartVM, refused)
		before := w.counts()
		_, op := w.run(w.ctx, w.record(commands.OpFailover, w.failoverReq(), testVM))
		if op.Status != commands.StatusFailed || op.Details[commands.DetailCompensated] != true ||
			op.Details["code"] != commands.CodeCloudStackError || op.Details[commands.DetailLeft] != nil {
			t.Fatalf("failover %s: %s %v", op.Status, op.Error, op.Details)
		}
		w.wantBack()
		// Forward: 2 attaches to the test VM; undo: 2 back.
		w.wantOnce(w.since(before), 2, 2, map[string]int64{csfake.CmdCreateSnapshot: 2, csfake.CmdDeleteSnapshot: 2, csfake.CmdStartVM: 1})
		var got []string
		for _, s := range op.Workflow.Steps {
			got = append(got, s.Name+":"+s.Status)
		}
		want := []string{"snapshot:undone", "snapshot:undone", "detach:undone", "detach:undone", "attach:undone", "attach:undone", "start_vm:failed",
			"detach:done", "detach:done", "attach:done", "export:done", "attach:done", "export:done", "delete_snapshot:done", "delete_snapshot:done"}
		if !slices.Equal(got, want) {
			t.Fatalf("steps %v\nwant %v", got, want)
		}
		if steps, _ := op.Details[commands.DetailSteps].([]any); len(steps) != len(want) {
			t.Fatalf("details steps: %v", op.Details[commands.DetailSteps])
		}
	})
	t.Run("data volume in use when its detach comes", func(t *testing.T) {
		w := newFoWorld(t)
		id := w.record(commands.OpFailover, w.failoverReq(), testVM)
		w.events.set(func(op commands.Operation) {
			if op.ID == id && op.Step == "3:detach:"+w.data {
				w.users.mu.Lock()
				w.users.users[w.data] = []commands.DeviceUser{mounted}
				w.users.mu.Unlock()
			}
		})
		_, op := w.run(w.ctx, id)
		if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeConflict || op.Details[commands.DetailCompensated] != true ||
			!strings.Contains(op.Error, "in use") {
			t.Fatalf("failover %s: %s %v", op.Status, op.Error, op.Details)
		}
		w.wantBack()
	})
	t.Run("attach-root refused", func(t *testing.T) {
		w := newFoWorld(t)
		w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{Err: csfake.Final(csfake.CmdAttachVolume, 431, "Vm already has root volume attached to it")})
		_, op := w.run(w.ctx, w.record(commands.OpFailover, w.failoverReq(), testVM))
		if op.Status != commands.StatusFailed || op.Details[commands.DetailCompensated] != true {
			t.Fatalf("failover %s: %s %v", op.Status, op.Error, op.Details)
		}
		w.wantBack()
	})
	t.Run("undo cannot finish", func(t *testing.T) {
		w := newFoWorld(t)
		w.cloud.Script(csfake.CmdStartVM, refused)
		// The forward attaches pass; the first attach back (of the data
		// volume, detached last) is refused.
		w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{}, csfake.Fault{},
			csfake.Fault{Err: csfake.Final(csfake.CmdAttachVolume, 431, "refused (test)")})
		_, op := w.run(w.ctx, w.record(commands.OpFailover, w.failoverReq(), testVM))
		if op.Status != commands.StatusFailed || op.Details[commands.DetailCompensated] != false {
			t.Fatalf("failover %s: %s %v", op.Status, op.Error, op.Details)
		}
		left, _ := op.Details[commands.DetailLeft].([]any)
		var text []string
		for _, l := range left {
			text = append(text, l.(string))
		}
		snap := op.Workflow.Snapshots[w.data]
		want := []string{"volume " + w.data + " is detached; it was on VM " + appliance + " exported as " + exportName(w.data),
			"snapshot " + snap + " of volume " + w.data + " is kept"}
		if !slices.Equal(text, want) {
			t.Fatalf("left %q\nwant %q", text, want)
		}
		// The root is back; the data volume is detached, its snapshot kept.
		if p := w.where(w.root); p.vm != appliance || p.export != exportName(w.root) {
			t.Fatalf("root: %+v", p)
		}
		if p := w.where(w.data); p.vm != "" || w.snapshots(w.data) != 1 || w.snapshots(w.root) != 0 {
			t.Fatalf("data volume: %+v, %d snapshots", p, w.snapshots(w.data))
		}
	})
}

// TestFailoverInUse: a volume in use on the appliance refuses the
// failover before any step (at acceptance, and again when it runs);
// force moves it all the same.
func TestFailoverInUse(t *testing.T) {
	w := newFoWorld(t)
	w.users.mu.Lock()
	w.users.users[w.data] = []commands.DeviceUser{nbdClient}
	w.users.mu.Unlock()
	var acc engine.Accepter
	for _, k := range w.engine.Kinds() {
		if k.Type() == commands.OpFailover {
			acc = k.(engine.Accepter)
		}
	}
	body, _ := json.Marshal(w.failoverReq())
	cmd, err := acc.Decode(w.ctx, commands.SubjectFailover, body)
	w.must(err)
	if !slices.Equal(cmd.VolumeIDs, []string{w.root, w.data}) || cmd.VolumeID != w.root || *cmd.VMID != testVM {
		t.Fatalf("command: %+v", cmd)
	}
	var ce *commands.Error
	if err := cmd.Check(w.ctx, w.ctx); !errors.As(err, &ce) || ce.Code != commands.CodeConflict || !strings.Contains(ce.Message, "in use") {
		t.Fatalf("pre-check: %v, want CONFLICT in use", err)
	}
	before := w.counts()
	_, op := w.run(w.ctx, w.record(commands.OpFailover, w.failoverReq(), testVM))
	if op.Status != commands.StatusFailed || op.Details["code"] != commands.CodeConflict || op.Details[commands.DetailCompensated] != true {
		t.Fatalf("failover %s: %s %v", op.Status, op.Error, op.Details)
	}
	if steps, _ := op.Details[commands.DetailSteps].([]any); len(steps) != 0 || op.Workflow != nil {
		t.Fatalf("steps recorded: %v %+v", op.Details[commands.DetailSteps], op.Workflow)
	}
	w.wantOnce(w.since(before), 0, 0, map[string]int64{csfake.CmdCreateSnapshot: 0, csfake.CmdDetachVolume: 0, csfake.CmdAttachVolume: 0})

	req := w.failoverReq()
	req.Force = true
	w.wantFailedOver(w.finish(w.record(commands.OpFailover, req, testVM)))
}

// TestRollbackPrechecks: only a completed test failover is rolled back,
// once: a live one, a failed one, an unknown one and one already rolled
// back are refused.
func TestRollbackPrechecks(t *testing.T) {
	w := newFoWorld(t)
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	live := w.failoverReq()
	live.Test = false
	liveOp := w.record(commands.OpFailover, live, testVM) // pending: not completed either
	var acc engine.Accepter
	for _, k := range w.engine.Kinds() {
		if k.Type() == commands.OpRollback {
			acc = k.(engine.Accepter)
		}
	}
	check := func(id string) error {
		body, _ := json.Marshal(commands.RollbackRequest{FailoverID: id})
		cmd, err := acc.Decode(w.ctx, commands.SubjectRollback, body)
		if err == nil {
			if !slices.Equal(cmd.VolumeIDs, []string{w.root, w.data}) {
				t.Fatalf("rollback's volumes %v", cmd.VolumeIDs)
			}
			err = cmd.Check(w.ctx, w.ctx)
		}
		return err
	}
	wantCode := func(err error, code string) {
		t.Helper()
		var ce *commands.Error
		if !errors.As(err, &ce) || ce.Code != code {
			t.Fatalf("answer %v, want %s", err, code)
		}
	}
	if err := check(fo.ID); err != nil {
		t.Fatalf("rollback of a completed test failover refused: %v", err)
	}
	wantCode(check("op-"+uuid.NewString()), commands.CodeNotFound)
	wantCode(check(liveOp), commands.CodeConflict)
	child := engine.ChildID(fo.ID, 0) // a snapshot
	err := check(child)
	wantCode(err, commands.CodeConflict)
	if ce := (*commands.Error)(nil); errors.As(err, &ce) && ce.Message != "operation "+child+" is not a failover: its type is snapshot" {
		t.Fatalf("rollback of a snapshot: %q", ce.Message)
	}
	rb := w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM)
	wantCode(check(fo.ID), commands.CodeConflict) // pending
	w.finish(rb)
	wantCode(check(fo.ID), commands.CodeConflict) // completed
}

// TestVMPower: start_vm and stop_vm ask the VM's state first, settle a
// lost answer by it, and stop gracefully, forced after the grace period
// (or at once when asked).
func TestVMPower(t *testing.T) {
	lost := csfake.Fault{LostAnswer: true}
	for _, tc := range []struct {
		name   string
		typ    commands.OpType
		vm     string // its state is set first
		state  string
		forced bool
		faults []csfake.Fault
		want   string // the VM's state after
		msg    string
		stops  []bool // the forced flag of each stop sent
		starts int64
		// slow: the job whose answer was lost ends only once the settle
		// timeout has long passed (the VM Starting or Stopping meanwhile).
		slow bool
	}{
		{name: "start", typ: commands.OpStartVM, vm: testVM, state: csfake.Stopped, want: kinds.VMRunning, msg: "VM started", starts: 1},
		{name: "start, running already", typ: commands.OpStartVM, vm: appliance, state: csfake.Running, want: kinds.VMRunning, msg: "VM already running"},
		{name: "start, answer lost", typ: commands.OpStartVM, vm: testVM, state: csfake.Stopped, faults: []csfake.Fault{lost},
			want: kinds.VMRunning, msg: "VM started", starts: 1},
		{name: "stop", typ: commands.OpStopVM, vm: appliance, state: csfake.Running, want: kinds.VMStopped, msg: "VM stopped", stops: []bool{false}},
		{name: "stop, stopped already", typ: commands.OpStopVM, vm: testVM, state: csfake.Stopped, want: kinds.VMStopped, msg: "VM already stopped"},
		{name: "stop forced at once", typ: commands.OpStopVM, vm: appliance, state: csfake.Running, forced: true, want: kinds.VMStopped,
			msg: "VM stopped", stops: []bool{true}},
		{name: "stop, answer lost", typ: commands.OpStopVM, vm: appliance, state: csfake.Running, faults: []csfake.Fault{lost},
			want: kinds.VMStopped, msg: "VM stopped", stops: []bool{false}},
		{name: "stop ignored by the guest: forced after the grace period", typ: commands.OpStopVM, vm: appliance, state: csfake.Running,
			faults: []csfake.Fault{{Job: csfake.JobPends}}, want: kinds.VMStopped, msg: "VM stopped (forced after 50ms)", stops: []bool{false, true}},
		{name: "start, answer lost, Starting past the settle timeout", typ: commands.OpStartVM, vm: testVM, state: csfake.Stopped,
			faults: []csfake.Fault{{LostAnswer: true, Job: csfake.JobPends}}, slow: true, want: kinds.VMRunning, msg: "VM started", starts: 1},
		{name: "stop, answer lost, Stopping past the settle timeout", typ: commands.OpStopVM, vm: appliance, state: csfake.Running,
			forced: true, faults: []csfake.Fault{{LostAnswer: true, Job: csfake.JobPends}}, slow: true, want: kinds.VMStopped,
			msg: "VM stopped", stops: []bool{true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFoWorld(t)
			w.cloud.SetVMState(tc.vm, tc.state)
			cmd := csfake.CmdStopVM
			if tc.typ == commands.OpStartVM {
				cmd = csfake.CmdStartVM
				// The test VM starts from a root disk.
				job, err := w.cloud.DetachVolume(w.ctx, w.root)
				w.must(err)
				_, err = w.cloud.WaitJob(w.ctx, job)
				w.must(err)
				root := int64(0)
				job, err = w.cloud.AttachVolume(w.ctx, w.root, testVM, &root)
				w.must(err)
				_, err = w.cloud.WaitJob(w.ctx, job)
				w.must(err)
			}
			w.cloud.Script(cmd, tc.faults...)
			raw, _ := json.Marshal(kinds.VMPowerRequest{VMID: tc.vm, Forced: tc.forced})
			now := time.Now().UTC()
			_, err := w.store.CreateOperation(w.ctx, commands.Operation{ID: "op-power", Type: tc.typ, Status: commands.StatusPending,
				Request: raw, CreatedAt: now, UpdatedAt: now})
			w.must(err)
			if tc.slow {
				go w.releaseLate("op-power")
			}
			op := w.finish("op-power")
			if op.Status != commands.StatusCompleted || op.Response.Message != tc.msg || w.vmState(tc.vm) != tc.want {
				t.Fatalf("%s: %s %s %+v, VM %s", tc.typ, op.Status, op.Error, op.Response, w.vmState(tc.vm))
			}
			if !slices.Equal(w.sent.stops, tc.stops) || w.sent.calls(csfake.CmdStartVM) != tc.starts {
				t.Fatalf("stops sent %v, starts %d; want %v and %d", w.sent.stops, w.sent.calls(csfake.CmdStartVM), tc.stops, tc.starts)
			}
		})
	}
}

// releaseLate releases the pending CloudStack job of operation id once the
// operation has settled its lost answer for ten settle timeouts (50 ms
// each), or once it ended.
func (w *foWorld) releaseLate(id string) {
	var since time.Time
	for {
		op, err := w.store.GetOperation(w.ctx, id)
		switch {
		case err != nil || op.Status.Terminal():
			return
		case since.IsZero() && strings.Contains(op.Error, "answer lost"):
			since = time.Now()
		case !since.IsZero() && time.Since(since) > 500*time.Millisecond:
			for _, job := range w.cloud.PendingJobs() {
				_ = w.cloud.Release(job)
			}
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestLateFailoverWritesNothing: executor B runs a failover and pauses
// once the root's attach recorded its CloudStack job. A takes the
// failover over (attempt 2) and completes it, the attach included. B
// resumes: it sees the job done, and writes nothing (no mapping, no
// record of the step or the workflow), stopping Lost.
func TestLateFailoverWritesNothing(t *testing.T) {
	w := newFoWorld(t)
	id := w.record(commands.OpFailover, w.failoverReq(), testVM)
	attach := engine.ChildID(id, 4)
	paused, resume := make(chan struct{}), make(chan struct{})
	var first atomic.Bool // not a sync.Once: A's events must not wait for B's pause
	w.events.set(func(op commands.Operation) {
		if op.ID == attach && op.JobID != "" && first.CompareAndSwap(false, true) {
			close(paused)
			<-resume
		}
	})
	done := make(chan engine.Result, 1)
	go func() {
		done <- w.engine.Run(w.ctx, id, slog.New(slog.NewTextHandler(w.log, nil)).With("executor", "B"))
	}()
	select {
	case <-paused:
	case <-time.After(10 * time.Second):
		t.Fatal("B never reached the root's attach job")
	}
	fo := w.finish(id) // A
	w.wantFailedOver(fo)
	mapping, err := w.store.GetMapping(w.ctx, w.root)
	w.must(err)
	child, err := w.store.GetOperation(w.ctx, attach)
	w.must(err)
	close(resume)
	select {
	case res := <-done:
		if res != engine.Lost {
			t.Fatalf("late executor's result %v, want Lost", res)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("late executor did not stop")
	}
	if !strings.Contains(w.log.String(), "taken over by another executor") {
		t.Fatalf("late executor stopped without saying why:\n%s", w.log.String())
	}
	after, err := w.store.GetOperation(w.ctx, id)
	w.must(err)
	m, err := w.store.GetMapping(w.ctx, w.root)
	w.must(err)
	c, err := w.store.GetOperation(w.ctx, attach)
	w.must(err)
	if after.Revision != fo.Revision || m.Revision != mapping.Revision || c.Revision != child.Revision {
		t.Fatalf("the late executor wrote: workflow %d→%d, mapping %d→%d, attach %d→%d",
			fo.Revision, after.Revision, mapping.Revision, m.Revision, child.Revision, c.Revision)
	}
	if n := w.cloud.Attaches(w.root); n != 2 { // the appliance's, then the test VM's
		t.Fatalf("root attached %d times in all, want 2", n)
	}
}

// TestFailoverCompensationKilled: an executor killed at each undo step of
// a failover whose start was refused is resumed by a new one: the undo
// finishes, compensated, each effect once.
func TestFailoverCompensationKilled(t *testing.T) {
	refused := csfake.Fault{Job: csfake.JobFails, JobErr: &csapi.Error{Command: csfake.CmdStartVM, Code: 533,
		Text: "Unable to create a deployment for VM"}}
	for n := 6; n < 15; n++ { // 6 is the failed start; 7… its undo
		for _, k := range []killPoint{atPending, atJob, atEnded} {
			t.Run(fmt.Sprintf("step %d %s", n, k), func(t *testing.T) {
				w := newFoWorld(t)
				w.cloud.Script(csfake.CmdStartVM, refused)
				before := w.counts()
				op := w.killedAndResumed(w.record(commands.OpFailover, w.failoverReq(), testVM), n, k)
				if op.Status != commands.StatusFailed || op.Details[commands.DetailCompensated] != true {
					t.Fatalf("failover %s: %s %v", op.Status, op.Error, op.Details)
				}
				w.wantBack()
				w.wantOnce(w.since(before), 2, 2, map[string]int64{csfake.CmdCreateSnapshot: 2, csfake.CmdDeleteSnapshot: 2, csfake.CmdStartVM: 1})
			})
		}
	}
}

// TestRollbackFailsAndIsAskedAgain: a rollback whose step fails for good
// ends failed, not compensated, saying what is left where; asked again, it
// plans from where each volume is and puts everything back, a volume
// already back neither detached nor reverted again.
func TestRollbackFailsAndIsAskedAgain(t *testing.T) {
	w := newFoWorld(t)
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	// The root's attach back passes, the data volume's is refused.
	w.cloud.Script(csfake.CmdAttachVolume, csfake.Fault{}, csfake.Fault{Err: csfake.Final(csfake.CmdAttachVolume, 431, "refused (test)")})
	_, rb := w.run(w.ctx, w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusFailed || rb.Details[commands.DetailCompensated] != false {
		t.Fatalf("rollback %s: %s %v", rb.Status, rb.Error, rb.Details)
	}
	var left []string
	for _, l := range rb.Details[commands.DetailLeft].([]any) {
		left = append(left, l.(string))
	}
	want := []string{"volume " + w.root + " is on VM " + appliance + " but not exported; it was exported as " + exportName(w.root),
		"volume " + w.data + " is detached; it was on VM " + appliance + " exported as " + exportName(w.data),
		"snapshot " + fo.Response.Snapshots[w.root] + " of volume " + w.root + " is kept",
		"snapshot " + fo.Response.Snapshots[w.data] + " of volume " + w.data + " is kept"}
	if !slices.Equal(left, want) {
		t.Fatalf("left %q\nwant %q", left, want)
	}
	before := w.counts()
	again := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if again.Status != commands.StatusCompleted {
		t.Fatalf("rollback asked again: %s %s %v", again.Status, again.Error, again.Details)
	}
	names := stepTargets(again)
	wantSteps := []string{"stop_vm:", "revert:" + w.data, "attach:" + w.data, "export:" + w.root, "export:" + w.data,
		"delete_snapshot:" + w.root, "delete_snapshot:" + w.data}
	if !slices.Equal(names, wantSteps) {
		t.Fatalf("steps asked again %v\nwant %v", names, wantSteps)
	}
	w.wantBack()
	got := w.since(before)
	if got.attaches[w.root] != 0 || got.attaches[w.data] != 1 || got.calls[csfake.CmdRevertSnapshot] != 1 || got.calls[csfake.CmdDetachVolume] != 0 {
		t.Fatalf("asked again: %+v", got)
	}
}

// TestFailoverPrechecks: a failover naming a VM or a volume CloudStack
// does not know is 404, one naming a volume already on the VM 409, a bad
// body 400; none is recorded.
func TestFailoverPrechecks(t *testing.T) {
	w := newFoWorld(t)
	var acc engine.Accepter
	for _, k := range w.engine.Kinds() {
		if k.Type() == commands.OpFailover {
			acc = k.(engine.Accepter)
		}
	}
	onTest := w.replicated(false)
	job, err := w.cloud.DetachVolume(w.ctx, onTest)
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	job, err = w.cloud.AttachVolume(w.ctx, onTest, testVM, nil)
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	for _, tc := range []struct {
		name string
		body string
		code string
	}{
		{"accepted", `{"vm_id":"` + testVM + `","root_volume_id":"` + w.root + `","data_volume_ids":["` + w.data + `"]}`, ""},
		{"unknown VM", `{"vm_id":"` + uuid.NewString() + `","root_volume_id":"` + w.root + `"}`, commands.CodeNotFound},
		{"unknown volume", `{"vm_id":"` + testVM + `","root_volume_id":"` + w.root + `","data_volume_ids":["` + uuid.NewString() + `"]}`, commands.CodeNotFound},
		{"volume on the VM already", `{"vm_id":"` + testVM + `","root_volume_id":"` + w.root + `","data_volume_ids":["` + onTest + `"]}`, commands.CodeConflict},
		{"root twice", `{"vm_id":"` + testVM + `","root_volume_id":"` + w.root + `","data_volume_ids":["` + w.root + `"]}`, commands.CodeInvalidRequest},
		{"unknown field", `{"vm_id":"` + testVM + `","root_volume_id":"` + w.root + `","quick":true}`, commands.CodeInvalidRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, err := acc.Decode(w.ctx, commands.SubjectFailover, []byte(tc.body))
			if err == nil {
				err = cmd.Check(w.ctx, w.ctx)
			}
			var ce *commands.Error
			switch {
			case tc.code == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.code != "" && (!errors.As(err, &ce) || ce.Code != tc.code):
				t.Fatalf("answer %v, want %s", err, tc.code)
			}
		})
	}
}

// TestFailoverPlans: a live failover takes no snapshot, one without
// start_vm leaves the VM Stopped, a detached volume has no detach step;
// refused at its start, such a failover puts the detached volume back
// detached.
func TestFailoverPlans(t *testing.T) {
	for _, tc := range []struct {
		name      string
		test      bool
		start     bool
		detached  bool // the data volume is detached at first
		refused   bool // its start is refused
		steps     []string
		snapshots int
		vm        string
	}{
		{name: "live", start: true, steps: []string{"detach", "detach", "attach", "attach", "start_vm"}, vm: kinds.VMRunning},
		{name: "test, no start", test: true, steps: []string{"snapshot", "snapshot", "detach", "detach", "attach", "attach"},
			snapshots: 1, vm: kinds.VMStopped},
		{name: "data volume detached", test: true, start: true, detached: true,
			steps: []string{"snapshot", "snapshot", "detach", "attach", "attach", "start_vm"}, snapshots: 1, vm: kinds.VMRunning},
		{name: "data volume detached, start refused", test: true, start: true, detached: true, refused: true,
			steps: []string{"snapshot", "snapshot", "detach", "attach", "attach", "start_vm",
				"detach", "detach", "attach", "export", "delete_snapshot", "delete_snapshot"}, vm: kinds.VMStopped},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFoWorld(t)
			if tc.detached {
				job, err := w.cloud.DetachVolume(w.ctx, w.data)
				w.must(err)
				_, err = w.cloud.WaitJob(w.ctx, job)
				w.must(err)
				w.must(w.store.DeleteExport(w.ctx, w.data, 0))
				m, err := w.store.GetMapping(w.ctx, w.data)
				w.must(err)
				w.must(w.store.DeleteMapping(w.ctx, w.data, m.Revision))
			}
			if tc.refused {
				w.cloud.Script(csfake.CmdStartVM, csfake.Fault{Job: csfake.JobFails})
			}
			req := w.failoverReq()
			req.Test, req.StartVM = tc.test, tc.start
			_, op := w.run(w.ctx, w.record(commands.OpFailover, req, testVM))
			var steps []string
			for _, s := range op.Workflow.Steps {
				steps = append(steps, s.Name)
			}
			if !slices.Equal(steps, tc.steps) {
				t.Fatalf("steps %v, want %v (%s %s)", steps, tc.steps, op.Status, op.Error)
			}
			if tc.refused != (op.Status == commands.StatusFailed) || w.vmState(testVM) != tc.vm {
				t.Fatalf("failover %s %s %v, VM %s", op.Status, op.Error, op.Details, w.vmState(testVM))
			}
			if w.snapshots(w.root) != tc.snapshots || w.snapshots(w.data) != tc.snapshots {
				t.Fatalf("snapshots %d and %d, want %d each", w.snapshots(w.root), w.snapshots(w.data), tc.snapshots)
			}
			data := w.where(w.data)
			switch {
			case tc.refused && (data.vm != "" || op.Details[commands.DetailCompensated] != true):
				t.Fatalf("data volume after the undo: %+v, want detached", data)
			case !tc.refused && data.vm != testVM:
				t.Fatalf("data volume: %+v, want on the test VM", data)
			}
		})
	}
}

// stepTargets lists a workflow's steps as "<name>:<volume>".
func stepTargets(op commands.Operation) []string {
	var names []string
	for _, s := range op.Workflow.Steps {
		names = append(names, s.Name+":"+s.VolumeID)
	}
	return names
}

// TestRollbackAskedAgainAfterItsReverts: a volume that was detached before
// the failover is back where it was once a rollback detached and reverted
// it. When that rollback fails after its reverts (a snapshot's deletion
// refused), the rollback asked again does not revert the volume again (its
// snapshot is deleted already): it completes.
func TestRollbackAskedAgainAfterItsReverts(t *testing.T) {
	w := newFoWorld(t)
	w.detachRoot()
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	if fo.Status != commands.StatusCompleted || fo.Response.Before[w.root].VMID != "" {
		t.Fatalf("failover: %s %s %+v", fo.Status, fo.Error, fo.Response)
	}
	// The root's snapshot is deleted, the data volume's refused.
	w.cloud.Script(csfake.CmdDeleteSnapshot, csfake.Fault{}, csfake.Fault{Err: csfake.Final(csfake.CmdDeleteSnapshot, 431, "refused (test)")})
	_, rb := w.run(w.ctx, w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusFailed || w.snapshots(w.root) != 0 || w.snapshots(w.data) != 1 {
		t.Fatalf("rollback %s: %s %v", rb.Status, rb.Error, rb.Details)
	}
	before := w.counts()
	again := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if again.Status != commands.StatusCompleted {
		t.Fatalf("rollback asked again: %s %s %v", again.Status, again.Error, again.Details)
	}
	names := stepTargets(again)
	if want := []string{"stop_vm:", "delete_snapshot:" + w.root, "delete_snapshot:" + w.data}; !slices.Equal(names, want) {
		t.Fatalf("steps asked again %v\nwant %v", names, want)
	}
	if got := w.since(before); got.calls[csfake.CmdRevertSnapshot] != 0 || w.snapshots(w.data) != 0 || w.where(w.root).vm != "" {
		t.Fatalf("asked again: %+v, data snapshots %d, root %+v", got, w.snapshots(w.data), w.where(w.root))
	}
}

// detachRoot detaches the root from the appliance, without its mapping
// and export.
func (w *foWorld) detachRoot() {
	w.t.Helper()
	job, err := w.cloud.DetachVolume(w.ctx, w.root)
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	m, err := w.store.GetMapping(w.ctx, w.root)
	w.must(err)
	w.must(w.store.DeleteMapping(w.ctx, w.root, m.Revision))
	e, err := w.store.GetExport(w.ctx, w.root)
	w.must(err)
	w.must(w.store.DeleteExport(w.ctx, w.root, e.Revision))
}

// TestRollbackFindsAThirdVM: a rollback that finds a volume on a VM that
// is neither the failover's nor where it was does nothing and fails not
// compensated, left saying where each volume is and which snapshots are
// kept.
func TestRollbackFindsAThirdVM(t *testing.T) {
	w := newFoWorld(t)
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	job, err := w.cloud.DetachVolume(w.ctx, w.data)
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	job, err = w.cloud.AttachVolume(w.ctx, w.data, thirdVM, nil)
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	before := w.counts()
	_, rb := w.run(w.ctx, w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusFailed || rb.Details[commands.DetailCompensated] != false || rb.Details["code"] != commands.CodeConflict {
		t.Fatalf("rollback %s: %s %v", rb.Status, rb.Error, rb.Details)
	}
	var left []string
	got, _ := rb.Details[commands.DetailLeft].([]any)
	for _, l := range got {
		left = append(left, l.(string))
	}
	want := []string{"volume " + w.root + " is attached to VM " + testVM + "; it was on VM " + appliance + " exported as " + exportName(w.root),
		"volume " + w.data + " is attached to VM " + thirdVM + "; it was on VM " + appliance + " exported as " + exportName(w.data),
		"snapshot " + fo.Response.Snapshots[w.root] + " of volume " + w.root + " is kept",
		"snapshot " + fo.Response.Snapshots[w.data] + " of volume " + w.data + " is kept"}
	if !slices.Equal(left, want) {
		t.Fatalf("left %q\nwant %q", left, want)
	}
	if got := w.since(before); slices.ContainsFunc(countedCalls, func(cmd string) bool { return got.calls[cmd] != 0 }) {
		t.Fatalf("the rollback called CloudStack: %v", got.calls)
	}
}

// prune runs a pass of the retention keeping terminal operations a
// nanosecond: every operation that ended is past it.
func (w *foWorld) prune() int {
	w.t.Helper()
	r, err := lease.NewRetention(lease.RetentionConfig{Store: w.store, Keep: time.Nanosecond, Holder: "test"})
	w.must(err)
	n, err := r.Prune(w.ctx)
	w.must(err)
	return n
}

// TestRollbackPastTheRetention: a completed test failover older than the
// retention is kept (its steps' children are not) and rolled back: the
// rollback is accepted and puts the volumes back. The failed rollback a
// retry reads is kept too. Once rolled back, the failover and its
// rollbacks age out.
func TestRollbackPastTheRetention(t *testing.T) {
	w := newFoWorld(t)
	w.detachRoot() // a retry knows the root reverted only from the failed rollback
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	if fo.Status != commands.StatusCompleted {
		t.Fatalf("failover: %s %s", fo.Status, fo.Error)
	}
	if n := w.prune(); n != len(fo.Workflow.Steps) {
		t.Fatalf("pruned %d, want the failover's %d children", n, len(fo.Workflow.Steps))
	}
	if _, err := w.store.GetOperation(w.ctx, fo.ID); err != nil {
		t.Fatalf("failover pruned: %v", err)
	}
	var acc engine.Accepter
	for _, k := range w.engine.Kinds() {
		if k.Type() == commands.OpRollback {
			acc = k.(engine.Accepter)
		}
	}
	body, _ := json.Marshal(commands.RollbackRequest{FailoverID: fo.ID})
	cmd, err := acc.Decode(w.ctx, commands.SubjectRollback, body)
	if err == nil {
		err = cmd.Check(w.ctx, w.ctx)
	}
	if err != nil {
		t.Fatalf("rollback past the retention refused: %v", err)
	}
	// A first rollback fails after its reverts (a snapshot's deletion
	// refused); the retention keeps it, so the one asked again does not
	// revert again (the root's snapshot is gone).
	w.cloud.Script(csfake.CmdDeleteSnapshot, csfake.Fault{}, csfake.Fault{Err: csfake.Final(csfake.CmdDeleteSnapshot, 431, "refused (test)")})
	_, failed := w.run(w.ctx, w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if failed.Status != commands.StatusFailed {
		t.Fatalf("first rollback %s: %s", failed.Status, failed.Error)
	}
	w.prune()
	for _, id := range []string{fo.ID, failed.ID} {
		if _, err := w.store.GetOperation(w.ctx, id); err != nil {
			t.Fatalf("%s pruned: %v", id, err)
		}
	}
	rb := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusCompleted {
		t.Fatalf("rollback: %s %s %v", rb.Status, rb.Error, rb.Details)
	}
	if w.snapshots(w.root) != 0 || w.snapshots(w.data) != 0 || w.where(w.root).vm != "" || w.where(w.data).vm != appliance {
		t.Fatalf("not back: root %+v, data %+v", w.where(w.root), w.where(w.data))
	}
	w.prune()
	for _, id := range []string{fo.ID, failed.ID, rb.ID} {
		if _, err := w.store.GetOperation(w.ctx, id); !errors.Is(err, state.ErrNotFound) {
			t.Fatalf("%s kept once rolled back: %v", id, err)
		}
	}
}

// TestRollbackBackAtTheirDevices: a rollback attaches each volume back at
// the device it had, whatever order the failover named them in; a device
// another volume took meanwhile is left to it, and the volume comes back
// at another (CloudStack picks), without failing the rollback.
func TestRollbackBackAtTheirDevices(t *testing.T) {
	for _, tc := range []struct {
		name string
		// swap names the data volume (device 2) as the failover's root.
		swap bool
		// taken attaches a new volume to the appliance during the test.
		taken bool
	}{
		{name: "root named first"},
		{name: "data volume named first", swap: true},
		{name: "device taken meanwhile", taken: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newFoWorld(t)
			req := w.failoverReq()
			if tc.swap {
				req.RootVolumeID, req.DataVolumeIDs = w.data, []string{w.root}
			}
			fo := w.finish(w.record(commands.OpFailover, req, testVM))
			if fo.Status != commands.StatusCompleted {
				t.Fatalf("failover: %s %s %v", fo.Status, fo.Error, fo.Details)
			}
			var other string
			if tc.taken {
				other = w.replicated(false) // at the root's device, free now
				if got := w.where(other).dev; got != w.devs[w.root] {
					t.Fatalf("new volume at device %d, want %d", got, w.devs[w.root])
				}
			}
			rb := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
			if rb.Status != commands.StatusCompleted {
				t.Fatalf("rollback: %s %s %v", rb.Status, rb.Error, rb.Details)
			}
			if !tc.taken {
				w.wantBack()
				return
			}
			// The root comes back at the device CloudStack picks, the
			// lowest free one, which may be the data volume's: that one
			// then takes another in turn.
			root, data := w.where(w.root), w.where(w.data)
			if root.vm != appliance || root.dev == w.devs[w.root] || data.vm != appliance || data.dev == root.dev ||
				w.where(other).dev != w.devs[w.root] {
				t.Fatalf("root %+v, data %+v, new volume %+v", root, data, w.where(other))
			}
		})
	}
}

// TestRollbackSnapshotGone: a rollback whose failover snapshot CloudStack
// no longer has cannot revert that volume, so it fails NOT_FOUND before
// any step: the test VM keeps running with both volumes on it, the other
// snapshot is kept, and left says so (not the snapshot that is gone).
func TestRollbackSnapshotGone(t *testing.T) {
	w := newFoWorld(t)
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	w.wantFailedOver(fo)
	gone := fo.Response.Snapshots[w.data]
	job, err := w.cloud.DeleteSnapshot(w.ctx, gone)
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	before := w.counts()
	_, rb := w.run(w.ctx, w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusFailed || rb.Details["code"] != commands.CodeNotFound || rb.Details["snapshot_id"] != gone ||
		rb.Details[commands.DetailCompensated] != false {
		t.Fatalf("rollback %s: %s %v", rb.Status, rb.Error, rb.Details)
	}
	if steps, _ := rb.Details[commands.DetailSteps].([]any); len(steps) != 0 {
		t.Fatalf("rollback ran steps: %v", rb.Details[commands.DetailSteps])
	}
	var left []string
	for _, l := range rb.Details[commands.DetailLeft].([]any) {
		left = append(left, l.(string))
	}
	want := []string{"volume " + w.root + " is attached to VM " + testVM + "; it was on VM " + appliance + " exported as " + exportName(w.root),
		"volume " + w.data + " is attached to VM " + testVM + "; it was on VM " + appliance + " exported as " + exportName(w.data),
		"snapshot " + fo.Response.Snapshots[w.root] + " of volume " + w.root + " is kept"}
	if !slices.Equal(left, want) {
		t.Fatalf("left %q\nwant %q", left, want)
	}
	got := w.since(before)
	for cmd, n := range got.calls {
		if n != 0 {
			t.Fatalf("the rollback called %s %d times: %v", cmd, n, got.calls)
		}
	}
	if p := w.where(w.root); p.vm != testVM || p.dev != 0 {
		t.Fatalf("root: %+v", p)
	}
	if s := w.vmState(testVM); s != kinds.VMRunning {
		t.Fatalf("test VM %s, want Running", s)
	}
}

// TestRollbackDeviceTakenAsItAttaches: a device free when the rollback
// looked, but that another attach to the VM takes before the rollback's
// attach job runs, fails that job; the rollback then attaches the volume
// at the device CloudStack picks and completes, the other volume keeping
// the device.
func TestRollbackDeviceTakenAsItAttaches(t *testing.T) {
	w := newFoWorld(t)
	fo := w.finish(w.record(commands.OpFailover, w.failoverReq(), testVM))
	if fo.Status != commands.StatusCompleted {
		t.Fatalf("failover: %s %s %v", fo.Status, fo.Error, fo.Details)
	}
	id, job, err := w.cloud.CreateVolume(w.ctx, csapi.CreateParams{Name: "other", SizeGiB: 1,
		DiskOfferingID: csfake.CustomOfferingID, ZoneID: csfake.ZoneID})
	w.must(err)
	_, err = w.cloud.WaitJob(w.ctx, job)
	w.must(err)
	want := w.devs[w.root]
	var once sync.Once
	w.sent.mu.Lock()
	w.sent.onAttach = func(volumeID, vmID string, deviceID *int64) {
		if volumeID != w.root || vmID != appliance || deviceID == nil || *deviceID != want {
			return
		}
		once.Do(func() {
			job, err := w.cloud.AttachVolume(w.ctx, id, appliance, &want)
			w.must(err)
			_, err = w.cloud.WaitJob(w.ctx, job)
			w.must(err)
		})
	}
	w.sent.mu.Unlock()
	rb := w.finish(w.record(commands.OpRollback, commands.RollbackRequest{FailoverID: fo.ID}, testVM))
	if rb.Status != commands.StatusCompleted {
		t.Fatalf("rollback: %s %s %v", rb.Status, rb.Error, rb.Details)
	}
	if root, other := w.where(w.root), w.where(id); root.vm != appliance || root.dev == want || other.dev != want {
		t.Fatalf("root %+v, the other volume %+v, want the root elsewhere than device %d", root, other, want)
	}
}
