package csfake_test

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/csfake"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
	"github.com/volumed/volumed/test/simtest"
)

// fault is a fault both clouds can inject into the next call of a command.
type fault int

const (
	f530       fault = iota // CloudStack answers 530, the command not run
	fLost                   // the command runs, its answer is lost
	fJobFail                // the command's job fails without effect
	fJobHang                // the command's job stays pending
	fDropped                // the connection drops before the command runs
	faultKinds              // count
)

// world is one cloud, the simulator through the real client or the
// fake, and the transcript a scenario writes of what it answered.
type world struct {
	t      *testing.T
	ctx    context.Context
	api    csapi.API
	inject func(command string, f fault)
	clear  func()
	fixed  map[string]bool   // the inventory's ids, shown as they are
	labels map[string]string // any other UUID → "#n", in order of appearance
	lines  []string
}

// inventory is the simulator's default inventory, which both clouds run.
func inventory() *cloudsim.Inventory { return cloudsim.DefaultInventory() }

// fakeConfig is the fake's Config for inv.
func fakeConfig(inv *cloudsim.Inventory) csfake.Config {
	cfg := csfake.Config{MaxDataDisks: inv.MaxDataDisks}
	for _, z := range inv.Zones {
		cfg.Zones = append(cfg.Zones, csapi.Zone{ID: z.ID, Name: z.Name})
	}
	for _, o := range inv.DiskOfferings {
		cfg.Offerings = append(cfg.Offerings, csfake.Offering{DiskOffering: csapi.DiskOffering{ID: o.ID, Name: o.Name},
			Custom: o.Custom, SizeGiB: o.SizeGB})
	}
	for _, vm := range inv.VMs {
		v := csfake.VM{VM: csapi.VM{ID: vm.ID, Name: vm.Name, State: vm.State, ZoneID: vm.ZoneID}}
		if vm.RootVolume != nil {
			v.RootVolumeID, v.RootSizeGiB = vm.RootVolume.ID, vm.RootVolume.SizeGB
		}
		cfg.VMs = append(cfg.VMs, v)
	}
	return cfg
}

func newWorld(t *testing.T, api csapi.API) *world {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	w := &world{t: t, ctx: ctx, api: api, fixed: map[string]bool{}, labels: map[string]string{}}
	inv := inventory()
	for _, z := range inv.Zones {
		w.fixed[z.ID] = true
	}
	for _, o := range inv.DiskOfferings {
		w.fixed[o.ID] = true
	}
	for _, vm := range inv.VMs {
		w.fixed[vm.ID] = true
		if vm.RootVolume != nil {
			w.fixed[vm.RootVolume.ID] = true
		}
	}
	return w
}

// simWorld runs the real client on a fresh simulator.
func simWorld(t *testing.T) *world {
	sim := simtest.Start(t, cloudsim.Config{JobDuration: 5 * time.Millisecond})
	w := newWorld(t, csapi.New(csapi.Config{URL: sim.URL(), APIKey: sim.APIKey(), SecretKey: sim.SecretKey()}))
	w.inject = func(cmd string, f fault) {
		var fs cloudsim.Faults
		switch f {
		case f530:
			fs.Errors = map[string]cloudsim.ErrorFault{cmd: {Rate: 1, Kind: cloudsim.ErrorKind530}}
		case fLost:
			fs.Errors = map[string]cloudsim.ErrorFault{cmd: {Rate: 1, Kind: cloudsim.ErrorKindDropAfter}}
		case fDropped:
			fs.Errors = map[string]cloudsim.ErrorFault{cmd: {Rate: 1, Kind: cloudsim.ErrorKindDrop}}
		case fJobFail:
			fs.JobFailureRate = map[string]float64{cmd: 1}
		case fJobHang:
			fs.JobHangRate = map[string]float64{cmd: 1}
		}
		if err := sim.SetFaults(fs); err != nil {
			t.Fatal(err)
		}
	}
	w.clear = func() {
		if err := sim.SetFaults(cloudsim.Faults{}); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

// fakeWorld runs the fake over the same inventory.
func fakeWorld(t *testing.T) *world {
	c := csfake.New(fakeConfig(inventory()))
	w := newWorld(t, c)
	w.inject = func(cmd string, f fault) {
		switch f {
		case f530:
			c.Script(cmd, csfake.Fault{Err: csfake.Retryable(cmd)})
		case fLost:
			c.Script(cmd, csfake.Fault{LostAnswer: true})
		case fDropped:
			// The request was written, then the connection dropped: the
			// client cannot tell it from a lost answer.
			c.Script(cmd, csfake.Fault{Err: csfake.Dropped(cmd)})
		case fJobFail:
			c.Script(cmd, csfake.Fault{Job: csfake.JobFails})
		case fJobHang:
			c.Script(cmd, csfake.Fault{Job: csfake.JobPends})
		}
	}
	w.clear = func() {}
	return w
}

var uuidRE = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)

// logf adds a line to the transcript, UUIDs outside the inventory
// replaced by labels in order of appearance.
func (w *world) logf(format string, args ...any) {
	line := uuidRE.ReplaceAllStringFunc(fmt.Sprintf(format, args...), func(id string) string {
		if w.fixed[id] {
			return id
		}
		if _, ok := w.labels[id]; !ok {
			w.labels[id] = fmt.Sprintf("#%d", len(w.labels)+1)
		}
		return w.labels[id]
	})
	w.lines = append(w.lines, line)
}

// errText describes an error by what callers act on: its command, codes,
// classification and, for CloudStack's own answers, its text.
func errText(err error) string {
	if err == nil {
		return "ok"
	}
	var e *csapi.Error
	if !errors.As(err, &e) {
		return fmt.Sprintf("plain error, not found %v", errors.Is(err, csapi.ErrNotFound))
	}
	s := fmt.Sprintf("%s error %d/%d retryable=%v limit=%d maybe_done=%v not_found=%v",
		e.Command, e.Code, e.CSCode, e.Retryable, e.RetryLimit, e.MaybeDone, errors.Is(err, csapi.ErrNotFound))
	if e.Code != 0 && !strings.Contains(e.Text, "injected") {
		s += ": " + e.Text
	}
	return s
}

// volText describes a volume; times only by whether they parse.
func volText(v *csapi.Volume) string {
	if v == nil {
		return "no volume"
	}
	dev := "none"
	if v.DeviceID != nil {
		dev = fmt.Sprint(*v.DeviceID)
	}
	_, cerr := time.Parse(csapi.TimeLayout, v.Created)
	attached := v.Attached == ""
	if !attached {
		_, aerr := time.Parse(csapi.TimeLayout, v.Attached)
		attached = aerr == nil
	}
	return fmt.Sprintf("volume %s %q %s %s %d B in %s %q on %q %q device %s (created ok %v, attached ok %v)",
		v.ID, v.Name, v.State, v.Type, v.Size, v.ZoneID, v.ZoneName, v.VMID, v.VMName, dev, cerr == nil, attached)
}

// jobText describes a finished or pending job.
func jobText(j csapi.Job, err error) string {
	return fmt.Sprintf("job %s status %d, %s; %s; job error %s", j.ID, j.Status, volText(j.Volume), errText(err), errText(j.Err))
}

// create creates a custom-size volume and waits for its job.
func (w *world) create(name string, gib int64) string {
	id, jobID, err := w.api.CreateVolume(w.ctx, csapi.CreateParams{Name: name, SizeGiB: gib,
		DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID})
	w.logf("create %s: %s %s, %s", name, id, jobID, errText(err))
	if err == nil {
		w.wait(jobID)
	}
	return id
}

// wait waits for a job and logs it.
func (w *world) wait(jobID string) {
	j, err := w.api.WaitJob(w.ctx, jobID)
	w.logf("wait: %s", jobText(j, err))
}

func (w *world) attach(vol, vm string, dev *int64) {
	jobID, err := w.api.AttachVolume(w.ctx, vol, vm, dev)
	w.logf("attach %s to %s: %s", vol, vm, errText(err))
	if err == nil {
		w.wait(jobID)
	}
}

func (w *world) detach(vol string) {
	jobID, err := w.api.DetachVolume(w.ctx, vol)
	w.logf("detach %s: %s", vol, errText(err))
	if err == nil {
		w.wait(jobID)
	}
}

func (w *world) delete(vol string) {
	w.logf("delete %s: %s", vol, errText(w.api.DeleteVolume(w.ctx, vol)))
}

func (w *world) get(vol string) {
	v, err := w.api.GetVolume(w.ctx, vol)
	if err != nil {
		w.logf("get %s: %s", vol, errText(err))
		return
	}
	w.logf("get %s: %s", vol, volText(&v))
}

func (w *world) list(f csapi.ListFilter) {
	vs, err := w.api.ListVolumes(w.ctx, f)
	w.logf("list %+v: %d, %s", f, len(vs), errText(err))
	for _, v := range vs {
		w.logf("  %s", volText(&v))
	}
}

// eventually polls cond: the simulator runs a job whose answer was lost
// a few milliseconds later; the fake at once.
func (w *world) eventually(what string, cond func() bool) {
	testenv.Eventually(w.t, 10*time.Second, cond, "%s", what)
	w.logf("eventually %s", what)
}

// attachedTo reports whether vol is attached to vm.
func (w *world) attachedTo(vol, vm string) func() bool {
	return func() bool {
		v, err := w.api.GetVolume(w.ctx, vol)
		return err == nil && v.VMID == vm
	}
}

func ptr(n int64) *int64 { return &n }

// unknownID is a well-formed UUID that names nothing.
const unknownID = "0badc0de-0000-4000-8000-000000000000"

// scenarios run the same calls against both clouds.
var scenarios = []struct {
	name string
	run  func(w *world)
}{
	{"inventory", func(w *world) {
		zones, err := w.api.ListZones(w.ctx)
		w.logf("zones %+v %s", zones, errText(err))
		offs, err := w.api.ListDiskOfferings(w.ctx)
		w.logf("offerings %+v %s", offs, errText(err))
		vms, err := w.api.ListVMs(w.ctx)
		w.logf("vms %+v %s", vms, errText(err))
		vm, err := w.api.GetVM(w.ctx, cloudsim.RemoteVMID)
		w.logf("vm %+v %s", vm, errText(err))
		_, err = w.api.GetVM(w.ctx, unknownID)
		w.logf("unknown vm: %s", errText(err))
		w.logf("ping: %s", errText(w.api.Ping(w.ctx)))
		w.list(csapi.ListFilter{})
		w.list(csapi.ListFilter{VMID: cloudsim.RemoteVMID})
		w.list(csapi.ListFilter{VMID: unknownID})
		w.list(csapi.ListFilter{ZoneID: unknownID})
	}},
	{"create", func(w *world) {
		id := w.create("c1", 5)
		w.get(id)
		w.list(csapi.ListFilter{Name: "c1"})
		fixedID, jobID, err := w.api.CreateVolume(w.ctx, csapi.CreateParams{Name: "c2", SizeGiB: 3,
			DiskOfferingID: cloudsim.FixedOfferingID, ZoneID: cloudsim.ZoneID})
		w.logf("create fixed: %s %s", fixedID, errText(err))
		w.wait(jobID)
		for _, p := range []csapi.CreateParams{
			{Name: "bad", DiskOfferingID: unknownID, ZoneID: cloudsim.ZoneID, SizeGiB: 1},
			{Name: "bad", DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: unknownID, SizeGiB: 1},
			{Name: "bad", DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID},
		} {
			_, _, err := w.api.CreateVolume(w.ctx, p)
			w.logf("create %+v: %s", p, errText(err))
		}
		w.list(csapi.ListFilter{Name: "bad"})
	}},
	{"device ids and limits", func(w *world) {
		var vols []string
		for i := range 7 {
			vols = append(vols, w.create(fmt.Sprintf("d%d", i), 1))
		}
		for _, v := range vols[:6] {
			w.attach(v, cloudsim.RemoteVMID, nil) // 1, 2, 4, 5, 6, 7
		}
		w.attach(vols[6], cloudsim.RemoteVMID, nil) // over the limit
		w.list(csapi.ListFilter{VMID: cloudsim.RemoteVMID})
		w.detach(vols[1])
		w.attach(vols[6], cloudsim.RemoteVMID, ptr(3)) // reserved
		w.attach(vols[6], cloudsim.RemoteVMID, ptr(4)) // taken
		w.attach(vols[6], cloudsim.RemoteVMID, ptr(9)) // out of range
		w.attach(vols[6], cloudsim.RemoteVMID, ptr(0)) // root on a running VM
		w.attach(vols[6], cloudsim.RemoteVMID, nil)    // 2 is free again
		w.attach(vols[6], cloudsim.RemoteVMID, nil)    // already attached
		w.attach(vols[1], cloudsim.TestVMID, ptr(0))   // root on a stopped VM
		w.get(vols[1])
		w.attach(vols[0], cloudsim.TestVMID, nil) // attached elsewhere
		w.detach(vols[1])                         // root of a stopped VM
		w.get(vols[1])
	}},
	{"detach and delete", func(w *world) {
		v := w.create("x", 1)
		w.detach(v) // not attached
		w.attach(v, cloudsim.RemoteVMID, nil)
		w.delete(v) // attached
		w.detach(v)
		w.get(v)
		w.delete(v)
		w.get(v)
		w.list(csapi.ListFilter{Name: "x"})
		w.delete(v)                           // deleted
		w.attach(v, cloudsim.RemoteVMID, nil) // deleted
		w.detach(v)
	}},
	{"unknown ids", func(w *world) {
		w.get(unknownID)
		w.attach(unknownID, cloudsim.RemoteVMID, nil)
		v := w.create("u", 1)
		w.attach(v, unknownID, nil)
		w.attach(v, "", nil)
		w.detach(unknownID)
		w.delete(unknownID)
		j, err := w.api.QueryJob(w.ctx, unknownID)
		w.logf("query unknown job: %s", jobText(j, err))
		j, err = w.api.WaitJob(w.ctx, unknownID)
		w.logf("wait unknown job: %s", jobText(j, err))
	}},
	{"530", func(w *world) {
		v := w.create("r", 1)
		for _, cmd := range []string{csfake.CmdAttachVolume, csfake.CmdListVolumes, csfake.CmdCreateVolume, csfake.CmdDeleteVolume} {
			w.inject(cmd, f530)
			switch cmd {
			case csfake.CmdAttachVolume:
				w.attach(v, cloudsim.RemoteVMID, nil)
			case csfake.CmdListVolumes:
				w.get(v)
			case csfake.CmdCreateVolume:
				w.create("r2", 1)
			case csfake.CmdDeleteVolume:
				w.delete(v)
			}
			w.clear()
		}
		w.get(v) // nothing happened
		w.list(csapi.ListFilter{Name: "r2"})
	}},
	{"lost answers", func(w *world) {
		v := w.create("l", 1)
		w.inject(csfake.CmdAttachVolume, fLost)
		w.attach(v, cloudsim.RemoteVMID, nil)
		w.clear()
		w.eventually("attached after a lost answer", w.attachedTo(v, cloudsim.RemoteVMID))
		w.get(v)
		w.inject(csfake.CmdDetachVolume, fLost)
		w.detach(v)
		w.clear()
		w.eventually("detached after a lost answer", w.attachedTo(v, ""))
		w.inject(csfake.CmdCreateVolume, fLost)
		w.create("l2", 2)
		w.clear()
		w.list(csapi.ListFilter{Name: "l2"}) // created all the same
		w.inject(csfake.CmdListVolumes, fLost)
		w.get(v) // a read: retryable
		w.clear()
		w.inject(csfake.CmdDeleteVolume, fLost)
		w.delete(v)
		w.clear()
		w.get(v) // deleted all the same
	}},
	{"dropped connection", func(w *world) {
		v := w.create("dc", 1)
		w.inject(csfake.CmdAttachVolume, fDropped)
		w.attach(v, cloudsim.RemoteVMID, nil)
		w.clear()
		w.get(v) // not attached
		w.inject(csfake.CmdListVolumes, fDropped)
		w.get(v)
		w.clear()
	}},
	{"failed and pending jobs", func(w *world) {
		v := w.create("j", 1)
		w.inject(csfake.CmdAttachVolume, fJobFail)
		w.attach(v, cloudsim.RemoteVMID, nil)
		w.clear()
		w.get(v) // not attached
		w.inject(csfake.CmdAttachVolume, fJobHang)
		jobID, err := w.api.AttachVolume(w.ctx, v, cloudsim.RemoteVMID, nil)
		w.clear()
		w.logf("attach with a hanging job: %s", errText(err))
		ctx, cancel := context.WithTimeout(w.ctx, 100*time.Millisecond)
		defer cancel()
		j, err := w.api.WaitJob(ctx, jobID)
		w.logf("wait: status %d %s", j.Status, errText(err))
		j, err = w.api.QueryJob(w.ctx, jobID)
		w.logf("query: %s", jobText(j, err))
		w.get(v)
	}},
	{"done context", func(w *world) {
		ctx, cancel := context.WithCancel(w.ctx)
		cancel()
		_, err := w.api.GetVolume(ctx, cloudsim.RemoteRootVolumeID)
		w.logf("get: %s", errText(err))
		_, err = w.api.AttachVolume(ctx, cloudsim.RemoteRootVolumeID, cloudsim.RemoteVMID, nil)
		w.logf("attach: %s", errText(err))
		w.list(csapi.ListFilter{VMID: cloudsim.RemoteVMID})
	}},
}

// snapText describes a snapshot; its time only by whether it parses, a
// default name only by its prefix (it ends in the time).
func snapText(s *csapi.Snapshot) string {
	if s == nil {
		return "no snapshot"
	}
	_, cerr := time.Parse(csapi.TimeLayout, s.Created)
	name := s.Name
	if i := strings.LastIndexByte(name, '_'); i > 0 && len(name)-i-1 == len("20060102150405") {
		name = name[:i] + "_<time>"
	}
	return fmt.Sprintf("snapshot %s %q of %s %s %d B in %s (created ok %v)", s.ID, name, s.VolumeID, s.State, s.Size, s.ZoneID, cerr == nil)
}

// fullJobText is jobText with the job's snapshot, VM and the volume's
// snapshot and tags.
func fullJobText(j csapi.Job, err error) string {
	vm := "no vm"
	if j.VM != nil {
		vm = fmt.Sprintf("vm %s %s", j.VM.ID, j.VM.State)
	}
	extra := ""
	if j.Volume != nil {
		extra = fmt.Sprintf(" from %q tags %v", j.Volume.SnapshotID, j.Volume.Tags)
	}
	return jobText(j, err) + extra + "; " + snapText(j.Snapshot) + "; " + vm
}

// submitted returns a function that logs a submit call's answer and
// waits for its job: w.submitted("what")(w.api.StartVM(…)).
func (w *world) submitted(what string) func(jobID string, err error) {
	return func(jobID string, err error) {
		w.logf("%s: %s", what, errText(err))
		if err == nil {
			j, err := w.api.WaitJob(w.ctx, jobID)
			w.logf("wait: %s", fullJobText(j, err))
		}
	}
}

// snapshot takes a snapshot and waits for it; it returns its id.
func (w *world) snapshot(vol, name string) string {
	id, jobID, err := w.api.CreateSnapshot(w.ctx, csapi.SnapshotParams{VolumeID: vol, Name: name})
	w.submitted(fmt.Sprintf("snapshot %s %q: %s", vol, name, id))(jobID, err)
	return id
}

func (w *world) snapshots(f csapi.SnapshotFilter) {
	ss, err := w.api.ListSnapshots(w.ctx, f)
	w.logf("snapshots %+v: %d, %s", f, len(ss), errText(err))
	for _, s := range ss {
		w.logf("  %s", snapText(&s))
	}
}

// getFull logs a volume with its snapshot and tags.
func (w *world) getFull(vol string) {
	v, err := w.api.GetVolume(w.ctx, vol)
	if err != nil {
		w.logf("get %s: %s", vol, errText(err))
		return
	}
	w.logf("get %s: %s from %q tags %v", vol, volText(&v), v.SnapshotID, v.Tags)
}

// vmState logs a VM's state.
func (w *world) vmState(vm string) {
	v, err := w.api.GetVM(w.ctx, vm)
	w.logf("vm %s: %s %s", vm, v.State, errText(err))
}

// lifecycleScenarios cover snapshots, revert, volumes from snapshots,
// resize, tags and VM power.
var lifecycleScenarios = []struct {
	name string
	run  func(w *world)
}{
	{"snapshots, revert, clones", func(w *world) {
		v := w.create("s", 2)
		w.snapshot(v, "too-early") // Allocated
		w.attach(v, cloudsim.RemoteVMID, nil)
		s1 := w.snapshot(v, "s1")
		w.snapshot(v, "") // CloudStack's default name
		for _, f := range []csapi.SnapshotFilter{{VolumeID: v}, {Name: "s1"}, {ID: s1}, {ID: unknownID}, {VolumeID: unknownID}} {
			w.snapshots(f)
		}
		s, err := w.api.GetSnapshot(w.ctx, s1)
		w.logf("get snapshot: %s %s", snapText(&s), errText(err))
		w.submitted("revert on a running VM")(w.api.RevertSnapshot(w.ctx, s1))
		w.submitted("stop")(w.api.StopVM(w.ctx, cloudsim.RemoteVMID, true))
		w.submitted("revert")(w.api.RevertSnapshot(w.ctx, s1))
		w.getFull(v)
		id, jobID, err := w.api.CreateVolume(w.ctx, csapi.CreateParams{Name: "clone", SnapshotID: s1})
		w.submitted("clone "+id)(jobID, err)
		for _, p := range []csapi.CreateParams{
			{Name: "bad", SnapshotID: s1, DiskOfferingID: cloudsim.CustomOfferingID, SizeGiB: 5},
			{Name: "bad", SnapshotID: unknownID},
			{Name: "bad"},
			{Name: "bad", DiskOfferingID: cloudsim.CustomOfferingID, ZoneID: cloudsim.ZoneID, SizeGiB: 1025},
			{Name: "bad", DiskOfferingID: cloudsim.FixedOfferingID, ZoneID: cloudsim.ZoneID, SizeGiB: 3},
		} {
			_, _, err := w.api.CreateVolume(w.ctx, p)
			w.logf("create %+v: %s", p, errText(err))
		}
		w.submitted("delete snapshot")(w.api.DeleteSnapshot(w.ctx, s1))
		w.submitted("delete it again")(w.api.DeleteSnapshot(w.ctx, s1))
		_, err = w.api.GetSnapshot(w.ctx, s1)
		w.logf("get deleted snapshot: %s", errText(err))
		w.snapshots(csapi.SnapshotFilter{ID: s1})
		_, _, err = w.api.CreateVolume(w.ctx, csapi.CreateParams{Name: "bad", SnapshotID: s1})
		w.logf("clone a deleted snapshot: %s", errText(err))
		w.submitted("revert a deleted snapshot")(w.api.RevertSnapshot(w.ctx, s1))
		_, err = w.api.DeleteSnapshot(w.ctx, unknownID)
		w.logf("delete an unknown snapshot: %s", errText(err))
		w.submitted("start")(w.api.StartVM(w.ctx, cloudsim.RemoteVMID))
	}},
	{"quiesced snapshot", func(w *world) {
		v := w.create("q", 1)
		w.attach(v, cloudsim.RemoteVMID, nil)
		id, jobID, err := w.api.CreateSnapshot(w.ctx, csapi.SnapshotParams{VolumeID: v, Name: "quiesced", Quiesce: true})
		w.submitted("quiesced snapshot "+id)(jobID, err)
		w.snapshots(csapi.SnapshotFilter{Name: "quiesced"})
		w.getFull(v)
		w.snapshot(v, "crash-consistent")
		w.detach(v)
	}},
	{"resize", func(w *world) {
		v := w.create("r", 1)
		w.submitted("resize Allocated")(w.api.ResizeVolume(w.ctx, v, 2, false))
		w.attach(v, cloudsim.RemoteVMID, nil)
		w.submitted("grow")(w.api.ResizeVolume(w.ctx, v, 4, false))
		w.submitted("same size")(w.api.ResizeVolume(w.ctx, v, 4, false))
		w.submitted("shrink without shrinkok")(w.api.ResizeVolume(w.ctx, v, 3, false))
		w.submitted("shrink")(w.api.ResizeVolume(w.ctx, v, 3, true))
		w.submitted("out of range")(w.api.ResizeVolume(w.ctx, v, 1025, false))
		w.getFull(v)
		_, err := w.api.ResizeVolume(w.ctx, unknownID, 1, false)
		w.logf("resize unknown: %s", errText(err))
		d := w.create("rd", 1)
		w.delete(d)
		w.submitted("resize deleted")(w.api.ResizeVolume(w.ctx, d, 2, false))
		w.inject(csfake.CmdResizeVolume, fJobHang)
		_, err = w.api.ResizeVolume(w.ctx, v, 5, false)
		w.clear()
		w.logf("resize with a hanging job: %s", errText(err))
		w.getFull(v) // Resizing
		w.submitted("resize during a resize")(w.api.ResizeVolume(w.ctx, v, 6, false))
	}},
	{"tags", func(w *world) {
		a, b := w.create("ta", 1), w.create("tb", 1)
		w.submitted("tag a")(w.api.CreateTags(w.ctx, a, map[string]string{"env": "dr", "app": "db"}))
		w.submitted("tag b")(w.api.CreateTags(w.ctx, b, map[string]string{"env": "dr"}))
		w.getFull(a)
		w.list(csapi.ListFilter{Tags: map[string]string{"env": "dr"}})
		w.list(csapi.ListFilter{Tags: map[string]string{"ENV": "DR", "app": "db"}})
		w.list(csapi.ListFilter{Tags: map[string]string{"app": "web"}})
		w.submitted("tag twice")(w.api.CreateTags(w.ctx, a, map[string]string{"Env": "x"}))
		w.submitted("empty value")(w.api.CreateTags(w.ctx, a, map[string]string{"e": ""}))
		w.submitted("untag")(w.api.DeleteTags(w.ctx, a, map[string]string{"app": "db"}))
		w.submitted("untag missing")(w.api.DeleteTags(w.ctx, a, map[string]string{"app": "db"}))
		w.submitted("untag other value")(w.api.DeleteTags(w.ctx, a, map[string]string{"env": "prod"}))
		_, err := w.api.DeleteTags(w.ctx, a, nil)
		w.logf("untag nothing: %v", err)
		w.getFull(a)
		w.delete(b)
		w.submitted("tag deleted")(w.api.CreateTags(w.ctx, b, map[string]string{"k": "v"}))
		w.submitted("untag deleted")(w.api.DeleteTags(w.ctx, b, map[string]string{"env": "dr"}))
	}},
	{"vm power", func(w *world) {
		w.submitted("start running")(w.api.StartVM(w.ctx, cloudsim.RemoteVMID))
		w.submitted("start without root")(w.api.StartVM(w.ctx, cloudsim.TestVMID))
		w.vmState(cloudsim.TestVMID)
		w.submitted("stop stopped")(w.api.StopVM(w.ctx, cloudsim.TestVMID, false))
		w.submitted("stop")(w.api.StopVM(w.ctx, cloudsim.RemoteVMID, false))
		w.vmState(cloudsim.RemoteVMID)
		_, err := w.api.StartVM(w.ctx, unknownID)
		w.logf("start unknown: %s", errText(err))
		w.inject(csfake.CmdStartVM, fJobHang)
		jobID, err := w.api.StartVM(w.ctx, cloudsim.RemoteVMID)
		w.clear()
		w.logf("start with a hanging job: %s", errText(err))
		w.vmState(cloudsim.RemoteVMID) // Starting
		j, err := w.api.QueryJob(w.ctx, jobID)
		w.logf("query: %s", fullJobText(j, err))
		w.inject(csfake.CmdStopVM, fJobFail)
		w.submitted("stop, job fails")(w.api.StopVM(w.ctx, cloudsim.TestVMID, false))
		w.clear()
		w.vmState(cloudsim.TestVMID)
	}},
	{"new calls under faults", func(w *world) {
		v := w.create("f", 1)
		w.attach(v, cloudsim.RemoteVMID, nil)
		w.inject(csfake.CmdCreateSnapshot, f530)
		w.snapshot(v, "f530")
		w.clear()
		w.snapshots(csapi.SnapshotFilter{Name: "f530"})
		w.inject(csfake.CmdCreateSnapshot, fLost)
		w.snapshot(v, "flost")
		w.clear()
		w.eventually("the snapshot of a lost answer backed up", func() bool {
			ss, err := w.api.ListSnapshots(w.ctx, csapi.SnapshotFilter{Name: "flost"})
			return err == nil && len(ss) == 1 && ss[0].State == csapi.SnapshotBackedUp
		})
		w.inject(csfake.CmdCreateSnapshot, fJobFail)
		w.snapshot(v, "ffail")
		w.clear()
		w.snapshots(csapi.SnapshotFilter{Name: "ffail"})
		w.inject(csfake.CmdCreateSnapshot, fJobHang)
		hung, _, err := w.api.CreateSnapshot(w.ctx, csapi.SnapshotParams{VolumeID: v, Name: "fhang"})
		w.clear()
		w.logf("snapshot with a hanging job: %s", errText(err))
		w.getFull(v)            // Snapshotting
		w.snapshot(v, "second") // refused while Snapshotting
		w.submitted("resize during a snapshot")(w.api.ResizeVolume(w.ctx, v, 2, false))
		w.submitted("delete a snapshot being taken")(w.api.DeleteSnapshot(w.ctx, hung))
		_, _, err = w.api.CreateVolume(w.ctx, csapi.CreateParams{Name: "bad", SnapshotID: hung})
		w.logf("clone a snapshot being taken: %s", errText(err))
		w.inject(csfake.CmdResizeVolume, fDropped)
		_, err = w.api.ResizeVolume(w.ctx, v, 2, false)
		w.clear()
		w.logf("resize dropped: %s", errText(err))
		w.inject(csfake.CmdCreateTags, fLost)
		_, err = w.api.CreateTags(w.ctx, v, map[string]string{"k": "v"})
		w.clear()
		w.logf("tags lost: %s", errText(err))
		w.eventually("tagged after a lost answer", func() bool {
			got, err := w.api.GetVolume(w.ctx, v)
			return err == nil && got.Tags["k"] == "v"
		})
		w.inject(csfake.CmdListSnapshots, f530)
		w.snapshots(csapi.SnapshotFilter{VolumeID: v})
		w.clear()
	}},
}

// TestAgreesWithSimulator runs every scenario on the simulator through the
// real client and on the fake, and wants the same transcript: the same
// answers, the same errors classified the same way, the same effects.
func TestAgreesWithSimulator(t *testing.T) {
	for _, sc := range append(scenarios, lifecycleScenarios...) {
		t.Run(sc.name, func(t *testing.T) {
			sim, fake := simWorld(t), fakeWorld(t)
			sc.run(sim)
			sc.run(fake)
			n := max(len(sim.lines), len(fake.lines))
			for i := range n {
				var s, f string
				if i < len(sim.lines) {
					s = sim.lines[i]
				}
				if i < len(fake.lines) {
					f = fake.lines[i]
				}
				if s != f {
					t.Errorf("line %d:\nsimulator: %s\nfake:      %s", i+1, s, f)
				}
			}
			if t.Failed() || testing.Verbose() {
				t.Logf("simulator transcript:\n%s", strings.Join(sim.lines, "\n"))
			}
		})
	}
}

// TestFaultKindsCovered keeps the agreement test honest: every fault kind
// is used by a scenario.
func TestFaultKindsCovered(t *testing.T) {
	used := map[fault]bool{}
	for _, sc := range append(scenarios, lifecycleScenarios...) {
		w := fakeWorld(t)
		inject := w.inject
		w.inject = func(cmd string, f fault) { used[f] = true; inject(cmd, f) }
		sc.run(w)
	}
	for f := range faultKinds {
		if !used[f] {
			t.Errorf("fault kind %d is in no scenario", f)
		}
	}
}
