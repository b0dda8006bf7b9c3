package cloudsim

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/google/uuid"
)

// Java class names CloudStack reports as a job's cmd.
var jobCmd = map[string]string{
	"createVolume":        "org.apache.cloudstack.api.command.user.volume.CreateVolumeCmd",
	"attachVolume":        "org.apache.cloudstack.api.command.user.volume.AttachVolumeCmd",
	"detachVolume":        "org.apache.cloudstack.api.command.user.volume.DetachVolumeCmd",
	"startVirtualMachine": "org.apache.cloudstack.api.command.user.vm.StartVMCmd",
	"stopVirtualMachine":  "org.apache.cloudstack.api.command.user.vm.StopVMCmd",
	"createSnapshot":      "org.apache.cloudstack.api.command.user.snapshot.CreateSnapshotCmd",
	"deleteSnapshot":      "org.apache.cloudstack.api.command.user.snapshot.DeleteSnapshotCmd",
	"revertSnapshot":      "org.apache.cloudstack.api.command.user.snapshot.RevertSnapshotCmd",
	"resizeVolume":        "org.apache.cloudstack.api.command.user.volume.ResizeVolumeCmd",
	"createTags":          "org.apache.cloudstack.api.command.user.tag.CreateTagsCmd",
	"deleteTags":          "org.apache.cloudstack.api.command.user.tag.DeleteTagsCmd",
}

const (
	jobAccountID = "27ef5ba2-5fe0-11ea-9a56-1e006800018c"
	jobUserID    = "27f2484f-5fe0-11ea-9a56-1e006800018c"
	// deviceTimeout bounds one loop device operation inside a job.
	deviceTimeout = 10 * time.Second
)

// newJob records a pending job, draws its faults and schedules it; s.mu is
// held.
func (s *Sim) newJob(cmd, instType, instID string, params map[string]string) (*job, *apiError) {
	f := s.Faults()
	d := s.cfg.JobDuration
	if fd, ok := lookup(f.JobDuration, cmd); ok {
		d = time.Duration(fd)
	}
	if s.cfg.JobJitter > 0 {
		d += time.Duration(s.rng.Int64N(int64(s.cfg.JobJitter)))
	}
	now := time.Now().UTC()
	j := &job{ID: uuid.NewString(), Command: cmd, InstanceType: instType, InstanceID: instID,
		Params: params, Created: now, Due: now.Add(d)}
	if r, ok := lookup(f.JobHangRate, cmd); ok && r > 0 && s.rng.Float64() < r {
		j.Hang = true
	}
	if r, ok := lookup(f.JobFailureRate, cmd); ok && r > 0 && s.rng.Float64() < r {
		j.Fail = true
	}
	j.Held, _ = lookup(f.JobHold, cmd)
	s.st.Jobs[j.ID] = j
	if err := s.st.save(s.cfg.StateDir); err != nil {
		delete(s.st.Jobs, j.ID)
		return nil, errInternal("Failed to create async job: %v", err)
	}
	if !j.Hang && !j.Held {
		s.schedule(j.ID, j.Due)
	}
	return j, nil
}

// release schedules the pending held jobs whose command f holds no more;
// s.mu is held. Before Start it does nothing: Start releases.
func (s *Sim) release(f Faults) {
	if s.ctx == nil {
		return
	}
	changed := false
	for _, j := range s.st.Jobs {
		if j.Status != jobPending || !j.Held {
			continue
		}
		if hold, _ := lookup(f.JobHold, j.Command); hold {
			continue
		}
		j.Held, changed = false, true
		if !j.Hang {
			s.schedule(j.ID, j.Due)
		}
	}
	if !changed {
		return
	}
	if err := s.st.save(s.cfg.StateDir); err != nil {
		s.log.Error("save state", "err", err.Error())
	}
}

// schedule runs a job at due unless the simulator closes first; s.mu is held.
func (s *Sim) schedule(id string, due time.Time) {
	if s.ctx.Err() != nil {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTimer(time.Until(due))
		defer t.Stop()
		select {
		case <-t.C:
			s.runJob(id)
		case <-s.ctx.Done():
		}
	}()
}

// runJob executes a due job and records its result. A job that has begun
// runs to its end even while the simulator closes.
func (s *Sim) runJob(id string) {
	s.execMu.Lock()
	defer s.execMu.Unlock()
	if s.ctx.Err() != nil {
		return // closing: the job stays pending and resumes after a restart
	}
	s.mu.Lock()
	j := s.st.Jobs[id]
	s.mu.Unlock()
	var res map[string]any
	var aerr *apiError
	if j.Fail {
		aerr = errInternal("Failed to execute %s: injected job failure (cloudsim)", j.Command)
		s.abandon(j)
	} else {
		res, aerr = s.execJob(context.Background(), j)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	j.Completed = time.Now().UTC()
	if aerr != nil {
		j.Status, j.ResultCode = jobFailure, aerr.Code
		j.Result, _ = json.Marshal(aerr.body(false))
	} else {
		j.Status = jobSuccess
		j.Result, _ = json.Marshal(res)
	}
	if err := s.st.save(s.cfg.StateDir); err != nil {
		s.log.Error("save state", "job", id, "err", err.Error())
	}
	s.log.Debug("job done", "job", id, "command", j.Command, "status", j.Status)
}

// abandon undoes what submitting a job that then fails without effect
// did: a VM back in its previous state, a snapshot in Error, a volume
// Ready again.
func (s *Sim) abandon(j *job) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if prev := j.Params["previous"]; prev != "" {
		s.st.VMStates[j.InstanceID] = prev
	}
	switch j.Command {
	case "createSnapshot":
		sn := s.st.Snapshots[j.InstanceID]
		sn.State = snapError
		s.readyAgain(sn.VolumeID, volSnapshotting)
	case "resizeVolume":
		if j.Params["resizing"] == "true" {
			s.readyAgain(j.InstanceID, volResizing)
		}
	}
}

// readyAgain makes a volume in the transitional state Ready; s.mu is held.
func (s *Sim) readyAgain(volID, transitional string) {
	if v := s.st.Volumes[volID]; v.State == transitional {
		v.State = volReady
	}
}

// execJob performs a job's command; execMu is held.
func (s *Sim) execJob(ctx context.Context, j *job) (map[string]any, *apiError) {
	switch j.Command {
	case "createVolume":
		return s.execCreateVolume(j)
	case "attachVolume":
		return s.execAttach(ctx, j.Params)
	case "detachVolume":
		return s.execDetach(ctx, j.Params)
	case "startVirtualMachine", "stopVirtualMachine":
		return s.execVMPower(j)
	case "createSnapshot":
		return s.execCreateSnapshot(j)
	case "deleteSnapshot":
		return s.execDeleteSnapshot(j)
	case "revertSnapshot":
		return s.execRevertSnapshot(j)
	case "resizeVolume":
		return s.execResize(j)
	case "createTags":
		return s.execCreateTags(j.Params)
	case "deleteTags":
		return s.execDeleteTags(j.Params)
	}
	return nil, errInternal("unknown job command %s", j.Command)
}

// execVMPower starts or stops a VM. Starting a Running VM is refused
// (UserVmManagerImpl), as is starting a VM without a root disk; stopping a
// Stopped VM succeeds (VirtualMachineManagerImpl.advanceStop).
func (s *Sim) execVMPower(j *job) (map[string]any, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vm, _ := s.inv.vm(j.InstanceID)
	prev := j.Params["previous"]
	if j.Command == "startVirtualMachine" {
		var aerr *apiError
		switch {
		case prev == vmRunning:
			aerr = errParam("The virtual machine %s (%s) is already running", vm.ID, vm.Name)
		case !s.hasRootDisk(vm.ID):
			aerr = &apiError{Code: 533, CSCode: csPlain, Text: "Unable to create a deployment for VM[User|" + instanceName(vm) + "]"}
		}
		if aerr != nil {
			s.st.VMStates[vm.ID] = prev
			return nil, aerr
		}
		s.st.VMStates[vm.ID] = vmRunning
	} else {
		s.st.VMStates[vm.ID] = vmStopped
	}
	return map[string]any{"virtualmachine": s.vmJSON(vm)}, nil
}

// hasRootDisk reports whether a volume is attached to the VM at device 0;
// s.mu is held.
func (s *Sim) hasRootDisk(vmID string) bool {
	for _, v := range s.st.Volumes {
		if !v.Removed && v.VMID == vmID && v.DeviceID != nil && *v.DeviceID == 0 {
			return true
		}
	}
	return false
}

// parseOptInt reads a job's optional integer parameter.
func parseOptInt(p string) *int64 {
	if p == "" {
		return nil
	}
	n, err := strconv.ParseInt(p, 10, 64)
	if err != nil {
		return nil
	}
	return &n
}

// checkAttach runs CloudStack's attach checks and picks the device id;
// s.mu is held.
func (s *Sim) checkAttach(v *volume, vm VM, want *int64) (int64, *apiError) {
	vmState := s.st.VMStates[vm.ID]
	var dataDisks int
	used := map[int64]bool{}
	for _, o := range s.st.Volumes {
		if o.VMID == vm.ID && !o.Removed {
			used[*o.DeviceID] = true
			if o.Type == typeData {
				dataDisks++
			}
		}
	}
	maxData := s.inv.maxDataDisks()
	maxDev := int64(maxData + 1) // ids 0..maxData+1 minus 3
	switch {
	case v.Removed:
		return 0, errParam("Please specify a volume that is not destroyed.")
	case v.VMID != "":
		return 0, errParam("Please specify a volume that is not attached to any VM.")
	case v.State != volAllocated && v.State != volReady:
		return 0, errParam("Volume state must be in Allocated, Ready or in Uploaded state")
	case vmState != vmRunning && vmState != vmStopped:
		return 0, errParam("Please specify a VM that is either running or stopped.")
	case vm.ZoneID != v.ZoneID:
		return 0, errParam("Please specify a VM that is in the same zone as the volume.")
	}
	if want != nil && *want == 0 {
		if vmState != vmStopped {
			return 0, errParam("Root volume detach can happen only when vm is in states: Stopped or Destroyed")
		}
		if used[0] {
			return 0, errParam("Vm already has root volume attached to it")
		}
	} else if dataDisks >= maxData {
		return 0, errParam("The specified VM already has the maximum number of data disks (%d) attached. Please specify another VM.", maxData)
	}
	if want != nil {
		if *want < 0 || *want > maxDev || *want == 3 {
			return 0, errInternal("deviceId should be 0,1,2,4-%d", maxDev)
		}
		if used[*want] {
			return 0, errInternal("deviceId %d is used by vm %s", *want, vm.ID)
		}
		return *want, nil
	}
	for id := int64(1); id <= maxDev; id++ {
		if id != 3 && !used[id] {
			return id, nil
		}
	}
	return 0, errInternal("All device Ids are used by vm %s", vm.ID)
}

// execAttach attaches a volume; for a VM with local devices it first
// creates the backing file and a new loop device.
func (s *Sim) execAttach(ctx context.Context, p map[string]string) (map[string]any, *apiError) {
	s.mu.Lock()
	v := s.st.Volumes[p["id"]]
	vm, ok := s.inv.vm(p["virtualmachineid"])
	if !ok {
		s.mu.Unlock()
		return nil, errParam("Please specify a valid User VM.")
	}
	dev, aerr := s.checkAttach(v, vm, parseOptInt(p["deviceid"]))
	backing := v.BackingFile
	s.mu.Unlock()
	if aerr != nil {
		return nil, aerr
	}
	fresh := backing == ""
	if fresh {
		var err error
		if backing, err = s.createBacking(v); err != nil {
			return nil, errInternal("Failed to attach volume %s to VM %s; %v", v.Name, vm.Name, err)
		}
	}
	var loop string
	if s.local(vm.ID) {
		dctx, cancel := context.WithTimeout(ctx, deviceTimeout)
		var err error
		loop, err = s.loops.attach(dctx, backing)
		cancel()
		if err != nil {
			if fresh {
				_ = removeFile(backing)
			}
			return nil, errInternal("Failed to attach volume %s to VM %s; %v", v.Name, vm.Name, err)
		}
		s.log.Info("loop device attached", "volume", v.ID, "device", loop, "backing", backing)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v.BackingFile, v.LoopDevice = backing, loop
	v.VMID, v.DeviceID, v.Attached, v.State = vm.ID, &dev, time.Now().UTC(), volReady
	if dev == 0 {
		v.Type = typeRoot
	}
	s.st.Attaches[v.ID]++
	return map[string]any{"volume": s.volumeJSON(v)}, nil
}

// createBacking makes the volume's sparse backing file.
func (s *Sim) createBacking(v *volume) (string, error) {
	path := filepath.Join(s.cfg.StateDir, disksDir, backingName(v.ID, s.cfg.AnonymousBackingFiles))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("create backing file: %w", err)
	}
	err = f.Truncate(v.Size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("size backing file: %w", err)
	}
	return path, nil
}

// backingName is the name of a volume's backing file: named by the volume,
// or random when anonymous.
func backingName(volID string, anonymous bool) string {
	if anonymous {
		b := make([]byte, 12)
		_, _ = rand.Read(b)
		return "disk-" + hex.EncodeToString(b) + ".img"
	}
	return "vol-" + volID + ".img"
}

// truncateUp grows path to size; a larger file is left as it is.
func truncateUp(path string, size int64) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.Size() >= size {
		return nil
	}
	return os.Truncate(path, size)
}

// execDetach detaches a volume named by id or by (virtualmachineid,
// deviceid), removing its loop device.
func (s *Sim) execDetach(ctx context.Context, p map[string]string) (map[string]any, *apiError) {
	dev := parseOptInt(p["deviceid"])
	s.mu.Lock()
	var v *volume
	switch {
	case p["id"] != "" && p["virtualmachineid"] == "" && dev == nil:
		v = s.st.Volumes[p["id"]]
	case p["id"] == "" && p["virtualmachineid"] != "" && dev != nil:
		for _, o := range s.st.Volumes {
			if !o.Removed && o.VMID == p["virtualmachineid"] && *o.DeviceID == *dev {
				v = o
			}
		}
	default:
		s.mu.Unlock()
		return nil, errParam("Please provide either a volume id, or a tuple(device id, instance id)")
	}
	if v == nil || v.Removed || v.VMID == "" {
		s.mu.Unlock()
		return nil, errParam("The specified volume is not attached to a VM.")
	}
	vmState := s.st.VMStates[v.VMID]
	loop := v.LoopDevice
	s.mu.Unlock()
	switch {
	case vmState != vmRunning && vmState != vmStopped:
		return nil, errParam("Please specify a VM that is either running or stopped.")
	case *v.DeviceID == 0 && vmState != vmStopped:
		return nil, errParam("Root volume detach can happen only when vm is in states: Stopped or Destroyed")
	}
	if loop != "" && s.loops != nil {
		dctx, cancel := context.WithTimeout(ctx, deviceTimeout)
		err := s.loops.detach(dctx, loop)
		cancel()
		if err != nil {
			// Still detached in CloudStack; a device of ours left behind
			// is removed by the next reconcile (restart or Teardown).
			s.log.Warn("loop device not removed", "volume", v.ID, "device", loop, "err", err.Error())
		} else {
			s.log.Info("loop device removed", "volume", v.ID, "device", loop)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v.VMID, v.DeviceID, v.Attached, v.LoopDevice = "", nil, time.Time{}, ""
	s.st.Detaches[v.ID]++
	return map[string]any{"volume": s.volumeJSON(v)}, nil
}

// removeFile removes path; a missing file is not an error.
func removeFile(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// jobJSON renders queryAsyncJobResult's answer; s.mu is held.
func jobJSON(j *job) map[string]any {
	m := map[string]any{
		"accountid": jobAccountID, "userid": jobUserID, "cmd": jobCmd[j.Command],
		"jobstatus": j.Status, "jobprocstatus": 0, "jobresultcode": j.ResultCode,
		"created": j.Created.Format(timeLayout), "jobid": j.ID,
	}
	if j.InstanceType != "" { // commands without an instance (createTags) have none
		m["jobinstancetype"], m["jobinstanceid"] = j.InstanceType, j.InstanceID
	}
	if j.Status != jobPending {
		m["jobresulttype"] = "object"
		m["jobresult"] = j.Result
		m["completed"] = j.Completed.Format(timeLayout)
	}
	return m
}
