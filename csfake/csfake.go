// Package csfake is an in-memory CloudStack behind csapi.API, for tests
// of the code that calls CloudStack: no HTTP, no simulator, no sleeping.
//
// It follows the rules the simulator (test/cloudsim) follows and returns
// the errors the real client (csapi.Client) returns for them, classified
// the same way: a new volume is Allocated and becomes Ready when
// attached; device ids are given 1, 2, 4, 5… (3 is reserved, 0 is the
// root disk); a VM takes at most MaxDataDisks data disks; an attach or
// detach that CloudStack refuses fails its job. Its agreement with the
// real client on the simulator is tested.
//
// It also takes snapshots (with revert and volumes from them), resizes,
// tags volumes and starts and stops VMs, by the same rules.
//
// Each call can be scripted (Script): a retryable or final error, a lost
// answer after the effect, and a job that stays pending (until Release),
// fails, or is expunged. Calls are counted per command. A job runs when
// it is submitted unless scripted otherwise. A Cloud is safe for
// concurrent use.
package csfake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/csapi"
)

// Fixed ids of Default's inventory.
const (
	// ZoneID is the one zone.
	ZoneID = "6a1b2c3d-0000-4000-8000-00000000000a"
	// CustomOfferingID is a custom-size disk offering.
	CustomOfferingID = "6a1b2c3d-0000-4000-8000-00000000000b"
	// FixedOfferingID is a 10 GiB disk offering.
	FixedOfferingID = "6a1b2c3d-0000-4000-8000-00000000000c"
	// VMID is a Running VM with a root disk at device 0.
	VMID = "6a1b2c3d-0000-4000-8000-00000000000d"
	// RootVolumeID is VMID's root volume.
	RootVolumeID = "6a1b2c3d-0000-4000-8000-00000000000e"
	// StoppedVMID is a Stopped VM without a root disk.
	StoppedVMID = "6a1b2c3d-0000-4000-8000-00000000000f"
	// DefaultMaxDataDisks is CloudStack's default data-disk limit per VM.
	DefaultMaxDataDisks = 6
)

// VM states.
const (
	Running = "Running"
	Stopped = "Stopped"
)

// Volume states and types.
const (
	Allocated = "Allocated"
	Ready     = "Ready"
	DataDisk  = "DATADISK"
	Root      = "ROOT"
)

// Commands as CloudStack names them: the keys of Script and CallsOf.
const (
	CmdCreateVolume      = "createVolume"
	CmdAttachVolume      = "attachVolume"
	CmdDetachVolume      = "detachVolume"
	CmdDeleteVolume      = "deleteVolume"
	CmdListVolumes       = "listVolumes"
	CmdListVMs           = "listVirtualMachines"
	CmdListZones         = "listZones"
	CmdListDiskOfferings = "listDiskOfferings"
	CmdQueryJob          = "queryAsyncJobResult"
	CmdResizeVolume      = "resizeVolume"
	CmdCreateSnapshot    = "createSnapshot"
	CmdListSnapshots     = "listSnapshots"
	CmdDeleteSnapshot    = "deleteSnapshot"
	CmdRevertSnapshot    = "revertSnapshot"
	CmdCreateTags        = "createTags"
	CmdDeleteTags        = "deleteTags"
	CmdStartVM           = "startVirtualMachine"
	CmdStopVM            = "stopVirtualMachine"
)

// sideEffects are the commands whose lost answer is MaybeDone.
var sideEffects = map[string]bool{CmdCreateVolume: true, CmdAttachVolume: true, CmdDetachVolume: true, CmdDeleteVolume: true,
	CmdResizeVolume: true, CmdCreateSnapshot: true, CmdDeleteSnapshot: true, CmdRevertSnapshot: true,
	CmdCreateTags: true, CmdDeleteTags: true, CmdStartVM: true, CmdStopVM: true}

// Config is the fixed inventory of a Cloud.
type Config struct {
	// Zones are the zones.
	Zones []csapi.Zone
	// Offerings are the disk offerings createVolume accepts.
	Offerings []Offering
	// VMs are the VMs, with their root disks.
	VMs []VM
	// MaxDataDisks is the data-disk limit per VM; 0 means DefaultMaxDataDisks.
	MaxDataDisks int
}

// Offering is a disk offering: custom-size, or of a fixed size.
type Offering struct {
	csapi.DiskOffering
	// Custom offerings take the size from createVolume.
	Custom bool
	// SizeGiB is a fixed offering's size.
	SizeGiB int64
}

// VM is a VM of the inventory; its State is Running or Stopped.
type VM struct {
	csapi.VM
	// RootVolumeID is the root disk's id at device 0; "" for none.
	RootVolumeID string
	// RootSizeGiB is the root disk's size.
	RootSizeGiB int64
}

// Default is a small inventory: one zone, a custom and a fixed offering,
// a Running VM with a root disk and a Stopped VM without one.
func Default() Config {
	return Config{
		Zones: []csapi.Zone{{ID: ZoneID, Name: "fake-zone"}},
		Offerings: []Offering{
			{DiskOffering: csapi.DiskOffering{ID: CustomOfferingID, Name: "Custom"}, Custom: true},
			{DiskOffering: csapi.DiskOffering{ID: FixedOfferingID, Name: "Small 10GB"}, SizeGiB: 10},
		},
		VMs: []VM{
			{VM: csapi.VM{ID: VMID, Name: "fake-vm", State: Running, ZoneID: ZoneID}, RootVolumeID: RootVolumeID, RootSizeGiB: 20},
			{VM: csapi.VM{ID: StoppedVMID, Name: "fake-stopped-vm", State: Stopped, ZoneID: ZoneID}},
		},
	}
}

// JobFate is what becomes of the async job of a scripted call.
type JobFate int

const (
	// JobRuns: the job takes effect and succeeds when submitted (or fails
	// as CloudStack would).
	JobRuns JobFate = iota
	// JobPends: the job stays pending, without effect, until Release.
	JobPends
	// JobFails: the job fails without effect, with Fault.JobErr.
	JobFails
	// JobExpunged: the job takes effect, then CloudStack forgets it:
	// QueryJob and WaitJob answer an error wrapping csapi.ErrNotFound.
	JobExpunged
)

// Fault scripts one call of a command.
type Fault struct {
	// Err fails the call with Err, without effect (see Retryable, Final,
	// Unreachable).
	Err error
	// LostAnswer: the call takes effect, then its answer is lost: a
	// MaybeDone error for a side-effecting command, a retryable one for a
	// read.
	LostAnswer bool
	// Job is what becomes of the call's job (every async command).
	Job JobFate
	// JobErr is the error of a JobFails job; nil is CloudStack's 530 for
	// a job that failed inside.
	JobErr *csapi.Error
}

// Retryable is the error the real client returns for CloudStack's 530
// answer (the command not run): retryable a few times.
func Retryable(command string) *csapi.Error {
	return &csapi.Error{Command: command, Code: 530, CSCode: 9999, Text: "injected fault (csfake)",
		Retryable: true, RetryLimit: csapi.Retries530}
}

// Final is the error the real client returns for a final CloudStack
// answer (4xx, 531–537) with code and text.
func Final(command string, code int, text string) *csapi.Error {
	return &csapi.Error{Command: command, Code: code, CSCode: 9999, Text: text}
}

// Unreachable is the error of a call that never reached CloudStack
// (connection refused): retryable.
func Unreachable(command string) *csapi.Error {
	return &csapi.Error{Command: command, Text: "dial tcp: connection refused (csfake)", Retryable: true, Err: errRefused}
}

var errRefused = errors.New("connection refused")

// Dropped is the real client's error for a call whose connection dropped
// after the request was written: MaybeDone for a side-effecting command
// (CloudStack may have run it), retryable for a read.
func Dropped(command string) *csapi.Error {
	e := &csapi.Error{Command: command, Text: "Post \"csfake\": unexpected EOF", Err: io.ErrUnexpectedEOF}
	if sideEffects[command] {
		e.MaybeDone = true
	} else {
		e.Retryable = true
	}
	return e
}

// notFound is CloudStack's 431 for a UUID parameter naming nothing.
func notFound(command, param, value string) *csapi.Error {
	return &csapi.Error{Command: command, Code: csapi.CodeParamError, CSCode: 9999,
		Text: csapi.InvalidParameterText(command, param, value), Err: csapi.ErrNotFound}
}

// missing is CloudStack's 431 for a mandatory parameter not given.
func missing(command, param string) *csapi.Error {
	return &csapi.Error{Command: command, Code: csapi.CodeParamError, CSCode: 9999,
		Text: fmt.Sprintf("Unable to execute API command %s due to missing parameter %s", strings.ToLower(command), param)}
}

// paramError is CloudStack's InvalidParameterValueException (431/4350) as
// an answer.
func paramError(command, format string, args ...any) *csapi.Error {
	return &csapi.Error{Command: command, Code: csapi.CodeParamError, CSCode: 4350, Text: fmt.Sprintf(format, args...)}
}

// jobFailure is a failed job's error as the real client reads it from the
// job result (no cserrorcode).
func jobFailure(command string, code int, format string, args ...any) *csapi.Error {
	return &csapi.Error{Command: command, Code: code, Text: fmt.Sprintf(format, args...)}
}

// volume is a stored volume.
type volume struct {
	id, name, zoneID, typ, state string
	offeringID                   string
	seq                          int64
	size                         int64
	created                      time.Time
	removed                      bool
	vmID                         string
	deviceID                     int64
	attached                     time.Time
	snapshotID                   string
	tags                         []tag
}

// result is what a job produced.
type result struct {
	volume   *csapi.Volume
	snapshot *csapi.Snapshot
	vm       *csapi.VM
}

// volumeResult wraps a volume job's outcome.
func volumeResult(v *csapi.Volume, err *csapi.Error) (result, *csapi.Error) {
	return result{volume: v}, err
}

// job is a stored async job.
type job struct {
	id, command string
	status      csapi.JobStatus
	result      result
	err         *csapi.Error
	// run takes the job's effect; nil once it ran.
	run func() (result, *csapi.Error)
	// undo reverts what submitting did when the job fails without effect.
	undo func()
}

// Cloud is an in-memory CloudStack.
type Cloud struct {
	mu       sync.Mutex
	cfg      Config
	vmStates map[string]string
	volumes  map[string]*volume
	snaps    map[string]*snapshot
	seq      int64
	jobs     map[string]*job
	script   map[string][]Fault
	calls    map[string]int64
	total    int64
	attaches map[string]int64
	detaches map[string]int64
	// changed is closed and replaced whenever a job changes.
	changed chan struct{}
}

var _ csapi.API = (*Cloud)(nil)

// New returns a Cloud over cfg's inventory, its root disks attached.
func New(cfg Config) *Cloud {
	if cfg.MaxDataDisks <= 0 {
		cfg.MaxDataDisks = DefaultMaxDataDisks
	}
	c := &Cloud{cfg: cfg, vmStates: map[string]string{}, volumes: map[string]*volume{}, snaps: map[string]*snapshot{}, jobs: map[string]*job{},
		script: map[string][]Fault{}, calls: map[string]int64{}, attaches: map[string]int64{},
		detaches: map[string]int64{}, changed: make(chan struct{})}
	now := time.Now().UTC().Truncate(time.Second)
	for _, vm := range cfg.VMs {
		c.vmStates[vm.ID] = vm.State
		if vm.RootVolumeID == "" {
			continue
		}
		c.seq++
		c.volumes[vm.RootVolumeID] = &volume{id: vm.RootVolumeID, name: "ROOT-" + vm.Name, zoneID: vm.ZoneID,
			typ: Root, state: Ready, seq: c.seq, size: vm.RootSizeGiB << 30, created: now,
			vmID: vm.ID, attached: now}
	}
	return c
}

// Script queues faults for the next calls of command, one a call, in
// order; a call with no fault queued runs normally.
func (c *Cloud) Script(command string, faults ...Fault) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.script[command] = append(c.script[command], faults...)
}

// Calls counts every API call made so far.
func (c *Cloud) Calls() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}

// CallsOf counts the calls of one command made so far (e.g.
// CallsOf(CmdAttachVolume)); failed and scripted calls count.
func (c *Cloud) CallsOf(command string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[command]
}

// Attaches counts the attach jobs that succeeded for a volume, as the
// simulator's stats do.
func (c *Cloud) Attaches(volumeID string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.attaches[volumeID]
}

// Detaches counts the detach jobs that succeeded for a volume.
func (c *Cloud) Detaches(volumeID string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.detaches[volumeID]
}

// SetVMState sets a VM's state (Running or Stopped).
func (c *Cloud) SetVMState(vmID, state string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.vmStates[vmID] = state
}

// PendingJobs lists the jobs still pending, sorted.
func (c *Cloud) PendingJobs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ids []string
	for id, j := range c.jobs {
		if j.status == csapi.JobPending {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// Release runs a pending job now: it takes effect and succeeds, or fails
// as CloudStack would. An error if the job is not pending.
func (c *Cloud) Release(jobID string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	j, ok := c.jobs[jobID]
	if !ok || j.status != csapi.JobPending {
		return fmt.Errorf("csfake: job %s is not pending", jobID)
	}
	c.finish(j)
	return nil
}

// FailJob ends a pending job now without effect, failed with err (nil
// is CloudStack's 530 for a job that failed inside). An error if the job
// is not pending.
func (c *Cloud) FailJob(jobID string, err *csapi.Error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	j, ok := c.jobs[jobID]
	if !ok || j.status != csapi.JobPending {
		return fmt.Errorf("csfake: job %s is not pending", jobID)
	}
	j.run = nil
	if j.undo != nil {
		j.undo()
	}
	j.status, j.err = csapi.JobFailure, err
	if j.err == nil {
		j.err = jobFailure(j.command, 530, "Failed to execute %s: injected job failure (csfake)", j.command)
	}
	c.notify()
	return nil
}

// call runs one call of command under c.mu: it counts the call, draws
// its fault and runs fn unless the fault fails it first. A done ctx fails
// the call as the real client does: retryable, never sent. A lost answer
// replaces fn's result after its effect.
func call[T any](ctx context.Context, c *Cloud, command string, fn func(f Fault) (T, error)) (T, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total++
	c.calls[command]++
	var f Fault
	if q := c.script[command]; len(q) > 0 {
		f, c.script[command] = q[0], q[1:]
	}
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, &csapi.Error{Command: command, Text: err.Error(), Retryable: true, Err: err}
	}
	if f.Err != nil {
		return zero, f.Err
	}
	v, err := fn(f)
	if f.LostAnswer {
		return zero, Dropped(command)
	}
	return v, err
}

// notify wakes WaitJob callers; c.mu is held.
func (c *Cloud) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// submit records a job for command whose effect is run, and runs it as
// the fault says; c.mu is held.
func (c *Cloud) submit(command string, f Fault, run func() (result, *csapi.Error)) string {
	return c.submitUndo(command, f, run, nil)
}

// submitUndo is submit for a job whose submission changed something
// (undo reverts it if the job fails without effect); c.mu is held.
func (c *Cloud) submitUndo(command string, f Fault, run func() (result, *csapi.Error), undo func()) string {
	j := &job{id: uuid.NewString(), command: command, run: run, undo: undo}
	c.jobs[j.id] = j
	switch f.Job {
	case JobPends:
	case JobFails:
		j.run = nil
		if undo != nil {
			undo()
		}
		j.status, j.err = csapi.JobFailure, f.JobErr
		if j.err == nil {
			j.err = jobFailure(command, 530, "Failed to execute %s: injected job failure (csfake)", command)
		}
	case JobExpunged:
		c.finish(j)
		delete(c.jobs, j.id)
	default:
		c.finish(j)
	}
	c.notify()
	return j.id
}

// finish runs a job's effect and records its end; c.mu is held.
func (c *Cloud) finish(j *job) {
	r, err := j.run()
	j.run = nil
	if err != nil {
		j.status, j.err = csapi.JobFailure, err
	} else {
		j.status, j.result = csapi.JobSuccess, r
	}
	c.notify()
}

// view renders a volume as the real client returns it; c.mu is held.
func (c *Cloud) view(v *volume) csapi.Volume {
	out := csapi.Volume{ID: v.id, Name: v.name, State: v.state, Type: v.typ, ZoneID: v.zoneID,
		Size: v.size, Created: v.created.Format(csapi.TimeLayout), SnapshotID: v.snapshotID, Tags: tagMap(v.tags)}
	for _, z := range c.cfg.Zones {
		if z.ID == v.zoneID {
			out.ZoneName = z.Name
		}
	}
	if v.vmID != "" {
		vm, _ := c.vm(v.vmID)
		dev := v.deviceID
		out.VMID, out.VMName, out.DeviceID, out.Attached = vm.ID, vm.Name, &dev, v.attached.Format(csapi.TimeLayout)
	}
	return out
}

// vm returns a VM of the inventory with its current state.
func (c *Cloud) vm(id string) (csapi.VM, bool) {
	for _, vm := range c.cfg.VMs {
		if vm.ID == id {
			out := vm.VM
			out.State = c.vmStates[id]
			return out, true
		}
	}
	return csapi.VM{}, false
}

func (c *Cloud) offering(id string) (Offering, bool) {
	for _, o := range c.cfg.Offerings {
		if o.ID == id {
			return o, true
		}
	}
	return Offering{}, false
}

func (c *Cloud) zone(id string) bool {
	return slices.ContainsFunc(c.cfg.Zones, func(z csapi.Zone) bool { return z.ID == id })
}

// created is CreateVolume's answer.
type created struct{ volumeID, jobID string }

// CreateVolume creates an Allocated volume at once; its job reports it.
func (c *Cloud) CreateVolume(ctx context.Context, p csapi.CreateParams) (string, string, error) {
	r, err := call(ctx, c, CmdCreateVolume, func(f Fault) (created, error) { return c.create(p, f) })
	return r.volumeID, r.jobID, err
}

// create runs createVolume's checks (from an offering or a snapshot) and
// records the volume; c.mu is held.
func (c *Cloud) create(p csapi.CreateParams, f Fault) (created, error) {
	off, ok := c.offering(p.DiskOfferingID)
	sn, snapOK := c.snaps[p.SnapshotID]
	switch {
	case p.DiskOfferingID != "" && !ok:
		return created{}, notFound(CmdCreateVolume, "diskofferingid", p.DiskOfferingID)
	case p.ZoneID != "" && !c.zone(p.ZoneID):
		return created{}, notFound(CmdCreateVolume, "zoneid", p.ZoneID)
	case p.SnapshotID != "" && !snapOK:
		return created{}, notFound(CmdCreateVolume, "snapshotid", p.SnapshotID)
	case p.DiskOfferingID == "" && p.SnapshotID == "":
		return created{}, paramError(CmdCreateVolume, "At least one of disk Offering ID or snapshot ID must be passed whilst creating volume")
	}
	var size int64
	zoneID, offID := p.ZoneID, p.DiskOfferingID
	if p.DiskOfferingID != "" {
		if snapOK && c.volumes[sn.volumeID].typ != Root {
			return created{}, paramError(CmdCreateVolume, "Disk Offering ID cannot be passed whilst creating volume from snapshot other than ROOT disk snapshots")
		}
		switch {
		case p.SizeGiB < 0:
			return created{}, paramError(CmdCreateVolume, "Disk size must be larger than 0")
		case off.Custom && p.SizeGiB == 0:
			return created{}, paramError(CmdCreateVolume, "This disk offering requires a custom size specified")
		case off.Custom && (p.SizeGiB < customMinGiB || p.SizeGiB > customMaxGiB):
			return created{}, paramError(CmdCreateVolume, "Volume size: %d GB is out of allowed range. Min: %d. Max: %d", p.SizeGiB, customMinGiB, customMaxGiB)
		case !off.Custom && p.SizeGiB != 0:
			return created{}, paramError(CmdCreateVolume, "This disk offering does not allow custom size")
		case off.Custom:
			size = p.SizeGiB << 30
		default:
			size = off.SizeGiB << 30
		}
	}
	if snapOK {
		parent := c.volumes[sn.volumeID]
		switch {
		case sn.state != SnapshotBackedUp:
			return created{}, paramError(CmdCreateVolume, "Snapshot id=%d is not in BackedUp state yet and can't be used for volume creation", sn.seq)
		case offID == "":
			offID, size = parent.offeringID, sn.size
		case size < sn.size:
			return created{}, paramError(CmdCreateVolume, "Invalid size for volume creation: %dGB, snapshot size is: %dGB", size>>30, sn.size>>30)
		}
		if zoneID == "" {
			zoneID = parent.zoneID
		}
	}
	if zoneID == "" {
		return created{}, paramError(CmdCreateVolume, "Please specify a valid zone.")
	}
	id := uuid.NewString()
	name := p.Name
	if name == "" {
		name = "DATA-" + id[:8]
	}
	c.seq++
	v := &volume{id: id, name: name, zoneID: zoneID, typ: DataDisk, state: Allocated, seq: c.seq, offeringID: offID,
		size: size, created: time.Now().UTC().Truncate(time.Second), snapshotID: p.SnapshotID}
	c.volumes[id] = v
	jobID := c.submit(CmdCreateVolume, f, func() (result, *csapi.Error) {
		if v.snapshotID != "" && v.state == Allocated {
			if c.snaps[v.snapshotID].state != SnapshotBackedUp {
				return result{}, jobFailure(CmdCreateVolume, 530, "Failed to create volume: %d", v.seq)
			}
			v.state = Ready
		}
		out := c.view(v)
		return result{volume: &out}, nil
	})
	return created{id, jobID}, nil
}

// AttachVolume submits an attach; its job runs CloudStack's checks.
func (c *Cloud) AttachVolume(ctx context.Context, volumeID, vmID string, deviceID *int64) (string, error) {
	return call(ctx, c, CmdAttachVolume, func(f Fault) (string, error) {
		v, err := c.volumeParam(CmdAttachVolume, volumeID)
		if err != nil {
			return "", err
		}
		if vmID == "" {
			return "", missing(CmdAttachVolume, "virtualmachineid")
		}
		if _, ok := c.vm(vmID); !ok {
			return "", notFound(CmdAttachVolume, "virtualmachineid", vmID)
		}
		var want *int64
		if deviceID != nil {
			d := *deviceID
			want = &d
		}
		return c.submit(CmdAttachVolume, f, func() (result, *csapi.Error) { return volumeResult(c.attach(v, vmID, want)) }), nil
	})
}

// volumeParam resolves the mandatory volume id of command; c.mu is held.
func (c *Cloud) volumeParam(command, id string) (*volume, error) {
	if id == "" {
		return nil, missing(command, "id")
	}
	v, ok := c.volumes[id]
	if !ok {
		return nil, notFound(command, "id", id)
	}
	return v, nil
}

// attach runs an attach job: CloudStack's checks, then the device id;
// c.mu is held.
func (c *Cloud) attach(v *volume, vmID string, want *int64) (*csapi.Volume, *csapi.Error) {
	const cmd = CmdAttachVolume
	vmState := c.vmStates[vmID]
	vm, _ := c.vm(vmID)
	used := map[int64]bool{}
	dataDisks := 0
	for _, o := range c.volumes {
		if o.vmID == vmID && !o.removed {
			used[o.deviceID] = true
			if o.typ == DataDisk {
				dataDisks++
			}
		}
	}
	maxDev := int64(c.cfg.MaxDataDisks + 1)
	switch {
	case v.removed:
		return nil, jobFailure(cmd, 431, "Please specify a volume that is not destroyed.")
	case v.vmID != "":
		return nil, jobFailure(cmd, 431, "Please specify a volume that is not attached to any VM.")
	case v.state != Allocated && v.state != Ready:
		return nil, jobFailure(cmd, 431, "Volume state must be in Allocated, Ready or in Uploaded state")
	case vmState != Running && vmState != Stopped:
		return nil, jobFailure(cmd, 431, "Please specify a VM that is either running or stopped.")
	case vm.ZoneID != v.zoneID:
		return nil, jobFailure(cmd, 431, "Please specify a VM that is in the same zone as the volume.")
	}
	if want != nil && *want == 0 {
		if vmState != Stopped {
			return nil, jobFailure(cmd, 431, "Root volume detach can happen only when vm is in states: Stopped or Destroyed")
		}
		if used[0] {
			return nil, jobFailure(cmd, 431, "Vm already has root volume attached to it")
		}
	} else if dataDisks >= c.cfg.MaxDataDisks {
		return nil, jobFailure(cmd, 431, "The specified VM already has the maximum number of data disks (%d) attached. Please specify another VM.", c.cfg.MaxDataDisks)
	}
	dev := int64(-1)
	switch {
	case want != nil && (*want < 0 || *want > maxDev || *want == 3):
		return nil, jobFailure(cmd, 530, "deviceId should be 0,1,2,4-%d", maxDev)
	case want != nil && used[*want]:
		return nil, jobFailure(cmd, 530, "deviceId %d is used by vm %s", *want, vmID)
	case want != nil:
		dev = *want
	default:
		for id := int64(1); id <= maxDev && dev < 0; id++ {
			if id != 3 && !used[id] {
				dev = id
			}
		}
		if dev < 0 {
			return nil, jobFailure(cmd, 530, "All device Ids are used by vm %s", vmID)
		}
	}
	v.vmID, v.deviceID, v.attached, v.state = vmID, dev, time.Now().UTC().Truncate(time.Second), Ready
	if dev == 0 {
		v.typ = Root
	}
	c.attaches[v.id]++
	out := c.view(v)
	return &out, nil
}

// DetachVolume submits a detach; its job fails if the volume is not
// attached.
func (c *Cloud) DetachVolume(ctx context.Context, volumeID string) (string, error) {
	return call(ctx, c, CmdDetachVolume, func(f Fault) (string, error) {
		v, err := c.volumeParam(CmdDetachVolume, volumeID)
		if err != nil {
			return "", err
		}
		return c.submit(CmdDetachVolume, f, func() (result, *csapi.Error) { return volumeResult(c.detach(v)) }), nil
	})
}

// detach runs a detach job; c.mu is held.
func (c *Cloud) detach(v *volume) (*csapi.Volume, *csapi.Error) {
	const cmd = CmdDetachVolume
	if v.removed || v.vmID == "" {
		return nil, jobFailure(cmd, 431, "The specified volume is not attached to a VM.")
	}
	switch state := c.vmStates[v.vmID]; {
	case state != Running && state != Stopped:
		return nil, jobFailure(cmd, 431, "Please specify a VM that is either running or stopped.")
	case v.deviceID == 0 && state != Stopped:
		return nil, jobFailure(cmd, 431, "Root volume detach can happen only when vm is in states: Stopped or Destroyed")
	}
	v.vmID, v.deviceID, v.attached = "", 0, time.Time{}
	c.detaches[v.id]++
	out := c.view(v)
	return &out, nil
}

// DeleteVolume deletes a detached volume at once; its id still resolves,
// as in CloudStack.
func (c *Cloud) DeleteVolume(ctx context.Context, volumeID string) error {
	_, err := call(ctx, c, CmdDeleteVolume, func(Fault) (struct{}, error) {
		v, err := c.volumeParam(CmdDeleteVolume, volumeID)
		switch {
		case err != nil:
			return struct{}{}, err
		case v.removed:
			gone := paramError(CmdDeleteVolume, "Unable to find volume with ID: %s", volumeID)
			gone.Err = csapi.ErrNotFound // as the real client classifies it
			return struct{}{}, gone
		case v.vmID != "":
			return struct{}{}, paramError(CmdDeleteVolume, "Please specify a volume that is not attached to any VM.")
		}
		v.removed, v.tags = true, nil
		return struct{}{}, nil
	})
	return err
}

// GetVolume returns a volume; a deleted or unknown one is an error
// wrapping csapi.ErrNotFound.
func (c *Cloud) GetVolume(ctx context.Context, volumeID string) (csapi.Volume, error) {
	return call(ctx, c, CmdListVolumes, func(Fault) (csapi.Volume, error) {
		v, ok := c.volumes[volumeID]
		switch {
		case volumeID != "" && !ok:
			return csapi.Volume{}, notFound(CmdListVolumes, "id", volumeID)
		case !ok || v.removed:
			return csapi.Volume{}, fmt.Errorf("cloudstack listVolumes: volume %s (0 listed): %w", volumeID, csapi.ErrNotFound)
		}
		return c.view(v), nil
	})
}

// ListVolumes returns the volumes lf selects, oldest first.
func (c *Cloud) ListVolumes(ctx context.Context, lf csapi.ListFilter) ([]csapi.Volume, error) {
	return call(ctx, c, CmdListVolumes, func(Fault) ([]csapi.Volume, error) {
		if _, ok := c.vm(lf.VMID); lf.VMID != "" && !ok {
			return nil, notFound(CmdListVolumes, "virtualmachineid", lf.VMID)
		}
		if lf.ZoneID != "" && !c.zone(lf.ZoneID) {
			return nil, notFound(CmdListVolumes, "zoneid", lf.ZoneID)
		}
		vols := slices.Collect(maps.Values(c.volumes))
		slices.SortFunc(vols, func(a, b *volume) int { return int(a.seq - b.seq) })
		var out []csapi.Volume
		for _, v := range vols {
			if v.removed || (lf.VMID != "" && v.vmID != lf.VMID) || (lf.Name != "" && v.name != lf.Name) ||
				(lf.ZoneID != "" && v.zoneID != lf.ZoneID) || !hasTags(v.tags, lf.Tags) {
				continue
			}
			out = append(out, c.view(v))
		}
		return out, nil
	})
}

// GetVM returns a VM or an error wrapping csapi.ErrNotFound.
func (c *Cloud) GetVM(ctx context.Context, vmID string) (csapi.VM, error) {
	return call(ctx, c, CmdListVMs, func(Fault) (csapi.VM, error) {
		vm, ok := c.vm(vmID)
		switch {
		case vmID != "" && !ok:
			return csapi.VM{}, notFound(CmdListVMs, "id", vmID)
		case !ok:
			return csapi.VM{}, fmt.Errorf("cloudstack listVirtualMachines: vm %s (%d listed): %w", vmID, len(c.cfg.VMs), csapi.ErrNotFound)
		}
		return vm, nil
	})
}

// ListZones lists every zone.
func (c *Cloud) ListZones(ctx context.Context) ([]csapi.Zone, error) {
	return list(ctx, c, CmdListZones, func() []csapi.Zone { return slices.Clone(c.cfg.Zones) })
}

// ListDiskOfferings lists every disk offering.
func (c *Cloud) ListDiskOfferings(ctx context.Context) ([]csapi.DiskOffering, error) {
	return list(ctx, c, CmdListDiskOfferings, func() []csapi.DiskOffering {
		var out []csapi.DiskOffering
		for _, o := range c.cfg.Offerings {
			out = append(out, o.DiskOffering)
		}
		return out
	})
}

// ListVMs lists every VM.
func (c *Cloud) ListVMs(ctx context.Context) ([]csapi.VM, error) {
	return list(ctx, c, CmdListVMs, func() []csapi.VM {
		var out []csapi.VM
		for _, vm := range c.cfg.VMs {
			v, _ := c.vm(vm.ID)
			out = append(out, v)
		}
		return out
	})
}

// list runs a list command without parameters.
func list[T any](ctx context.Context, c *Cloud, command string, items func() []T) ([]T, error) {
	return call(ctx, c, command, func(Fault) ([]T, error) { return items(), nil })
}

// Ping lists the zones, as the real client does.
func (c *Cloud) Ping(ctx context.Context) error {
	_, err := c.ListZones(ctx)
	return err
}

// QueryJob asks once for a job's state; an unknown or expunged job is an
// error wrapping csapi.ErrNotFound.
func (c *Cloud) QueryJob(ctx context.Context, jobID string) (csapi.Job, error) {
	job, err := call(ctx, c, CmdQueryJob, func(Fault) (csapi.Job, error) {
		j, ok := c.jobs[jobID]
		switch {
		case jobID == "":
			return csapi.Job{}, missing(CmdQueryJob, "jobid")
		case !ok:
			return csapi.Job{}, notFound(CmdQueryJob, "jobid", jobID)
		}
		out := csapi.Job{ID: jobID, Status: j.status}
		if j.result.volume != nil {
			v := *j.result.volume
			out.Volume = &v
		}
		if j.result.snapshot != nil {
			sn := *j.result.snapshot
			out.Snapshot = &sn
		}
		if j.result.vm != nil {
			vm := *j.result.vm
			out.VM = &vm
		}
		if j.err != nil {
			e := *j.err
			out.Err = &e
		}
		return out, nil
	})
	job.ID = jobID
	return job, err
}

// WaitJob polls the job until it ends or ctx is done, as the real client
// does: retryable poll errors are retried, a final one is returned, a
// failed job returns the job and its error.
func (c *Cloud) WaitJob(ctx context.Context, jobID string) (csapi.Job, error) {
	var lastErr error
	for {
		c.mu.Lock()
		changed := c.changed
		c.mu.Unlock()
		job, err := c.QueryJob(ctx, jobID)
		switch {
		case err == nil && job.Status != csapi.JobPending:
			return job, job.Err
		case err != nil && !csapi.IsRetryable(err):
			return job, err
		case err != nil && ctx.Err() == nil:
			lastErr = err
			continue // the next poll at once: the fake has no interval to wait
		}
		select {
		case <-changed:
		case <-ctx.Done():
			text := fmt.Sprintf("wait for job %s: %v", jobID, ctx.Err())
			if lastErr != nil {
				text += " (last poll: " + lastErr.Error() + ")"
			}
			return csapi.Job{ID: jobID, Status: csapi.JobPending},
				&csapi.Error{Command: CmdQueryJob, Text: text, Retryable: true, Err: ctx.Err()}
		}
	}
}
