package cloudsim

import (
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
)

// snapshotNameLayout is CloudStack's DateUtil.YYYYMMDD_FORMAT, the suffix
// of a default snapshot name.
const snapshotNameLayout = "20060102150405"

// QuiesceRefused is the text of the failed createSnapshot job of a
// quiesced snapshot of volumeID (CloudStack's error code 530).
func QuiesceRefused(volumeID string) string {
	return "Failed to create snapshot due to an internal error creating snapshot for volume " + volumeID
}

func (s *Sim) snapshotExists(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.st.Snapshots[id]
	return ok
}

// createSnapshot allocates the snapshot in the HTTP call (as
// VolumeApiServiceImpl.allocSnapshot: the volume must exist and be Ready)
// and copies the volume's data in the job. quiescevm=true is refused by
// the job (execCreateSnapshot), as CloudStack refuses it only there.
func (s *Sim) createSnapshot(q request) (any, *apiError) {
	volID, aerr := q.required("volumeid", s.volumeExists)
	if aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.st.Volumes[volID]
	switch {
	case v.Removed:
		return nil, errParam("Creating snapshot failed due to volume:%d doesn't exist", v.Seq)
	case v.State != volReady:
		return nil, errParam("VolumeId: %d is not in Ready state but %s. Cannot take snapshot.", v.Seq, v.State)
	}
	now := time.Now().UTC()
	name := q.str("name")
	if name == "" {
		vmName := "detached"
		if vm, ok := s.inv.vm(v.VMID); ok {
			vmName = vm.Name
		}
		name = vmName + "_" + v.Name + "_" + now.Format(snapshotNameLayout)
	}
	s.st.NextSeq++
	sn := &snapshot{ID: uuid.NewString(), Seq: s.st.NextSeq, Name: name, VolumeID: v.ID, Size: v.Size,
		State: snapCreating, Created: now}
	s.st.Snapshots[sn.ID] = sn
	// The job takes the volume through Snapshotting (VolumeServiceImpl's
	// SnapshotRequested), from now until it ends.
	v.State = volSnapshotting
	j, aerr := s.newJob(q.cmd, "Snapshot", sn.ID, map[string]string{"quiescevm": q.str("quiescevm")})
	if aerr != nil {
		delete(s.st.Snapshots, sn.ID)
		v.State = volReady
		return nil, aerr
	}
	return map[string]any{"id": sn.ID, "jobid": j.ID}, nil
}

// execCreateSnapshot copies the volume's backing file (a reflink where the
// filesystem has one) as the snapshot's file; then the volume is Ready
// again; execMu is held. A quiesced snapshot fails with nothing copied:
// DefaultSnapshotStrategy.takeSnapshot throws "can't handle quiescevm equal
// true for volume snapshot" and CreateSnapshotCmd.execute turns any
// exception into a 530 naming only the volume.
func (s *Sim) execCreateSnapshot(j *job) (map[string]any, *apiError) {
	s.mu.Lock()
	sn := s.st.Snapshots[j.InstanceID]
	v := s.st.Volumes[sn.VolumeID]
	removed := v.Removed
	s.mu.Unlock()
	quiesce := strings.EqualFold(j.Params["quiescevm"], "true")
	var err error
	if !removed && !quiesce {
		var backing string
		if backing, err = s.ensureBacking(v); err == nil {
			s.flushLoop(v)
			file := filepath.Join(s.cfg.StateDir, disksDir, "snap-"+sn.ID+".img")
			if err = cloneFile(backing, file); err == nil {
				s.mu.Lock()
				sn.File, sn.Size = file, v.Size
				s.mu.Unlock()
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readyAgain(v.ID, volSnapshotting)
	switch {
	case removed:
		sn.State = snapError
		return nil, errParam("Creating snapshot failed due to volume:%d doesn't exist", v.Seq)
	case quiesce:
		sn.State = snapError
		return nil, errInternal("%s", QuiesceRefused(v.ID))
	case err != nil:
		sn.State = snapError
		return nil, errInternal("Failed to create snapshot: %v", err)
	}
	sn.State = snapBackedUp
	return map[string]any{"snapshot": s.snapshotJSON(sn)}, nil
}

// ensureBacking returns the volume's backing file, creating a sparse one of
// the volume's size when it has none yet; execMu is held.
func (s *Sim) ensureBacking(v *volume) (string, error) {
	s.mu.Lock()
	backing := v.BackingFile
	s.mu.Unlock()
	if backing != "" {
		return backing, nil
	}
	backing, err := s.createBacking(v)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	v.BackingFile = backing
	s.mu.Unlock()
	return backing, nil
}

// flushLoop writes back and drops the page cache of the volume's loop
// device, if it has one; execMu is held.
func (s *Sim) flushLoop(v *volume) {
	s.mu.Lock()
	dev := v.LoopDevice
	s.mu.Unlock()
	if dev == "" || s.loops == nil {
		return
	}
	if err := flushBlockDevice(dev); err != nil {
		s.log.Warn("flush loop device", "volume", v.ID, "device", dev, "err", err.Error())
	}
}

func (s *Sim) listSnapshots(q request) (any, *apiError) {
	id, aerr := q.uuid("id", s.snapshotExists)
	if aerr != nil {
		return nil, aerr
	}
	volID, aerr := q.uuid("volumeid", s.volumeExists)
	if aerr != nil {
		return nil, aerr
	}
	zoneID, aerr := q.uuid("zoneid", s.zoneExists)
	if aerr != nil {
		return nil, aerr
	}
	tags := q.tags("tags")
	name, keyword := q.str("name"), q.str("keyword")
	s.mu.Lock()
	defer s.mu.Unlock()
	var snaps []*snapshot
	for _, sn := range s.st.Snapshots {
		v := s.st.Volumes[sn.VolumeID]
		if sn.State == snapDestroyed || (id != "" && sn.ID != id) || (volID != "" && sn.VolumeID != volID) ||
			(zoneID != "" && v.ZoneID != zoneID) || (name != "" && sn.Name != name) ||
			(keyword != "" && !strings.Contains(strings.ToLower(sn.Name), strings.ToLower(keyword))) ||
			(len(tags) > 0 && !s.hasAnyTag(tagSnapshot, sn.ID, tags)) {
			continue
		}
		snaps = append(snaps, sn)
	}
	// SnapshotManagerImpl.listSnapshots: newest first.
	slices.SortFunc(snaps, func(a, b *snapshot) int { return int(b.Seq - a.Seq) })
	items := make([]map[string]any, len(snaps))
	for i, sn := range snaps {
		items[i] = s.snapshotJSON(sn)
	}
	return listAnswer(q, "snapshot", items)
}

func (s *Sim) deleteSnapshot(q request) (any, *apiError) {
	id, aerr := q.required("id", s.snapshotExists)
	if aerr != nil {
		return nil, aerr
	}
	return s.submit(q.cmd, "Snapshot", id, nil)
}

// execDeleteSnapshot runs SnapshotManagerImpl.deleteSnapshot's checks and
// removes the snapshot's file; execMu is held.
func (s *Sim) execDeleteSnapshot(j *job) (map[string]any, *apiError) {
	s.mu.Lock()
	sn := s.st.Snapshots[j.InstanceID]
	state, file := sn.State, sn.File
	s.mu.Unlock()
	switch state {
	case snapDestroyed:
		return nil, errParam("Snapshot with id: %d is already destroyed", sn.Seq)
	case snapBackedUp, snapError:
	default:
		// DefaultSnapshotStrategy refuses; deleteSnapshot wraps it.
		return nil, errInternal("Failed to delete snapshot:com.cloud.exception.InvalidParameterValueException: "+
			"Can't delete snapshotshot %d due to it is in %s Status", sn.Seq, state)
	}
	if file != "" {
		if err := removeFile(file); err != nil {
			return nil, errInternal("Failed to delete snapshot:%v", err)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sn.State, sn.File = snapDestroyed, ""
	return map[string]any{"success": true}, nil
}

func (s *Sim) revertSnapshot(q request) (any, *apiError) {
	id, aerr := q.required("id", s.snapshotExists)
	if aerr != nil {
		return nil, aerr
	}
	return s.submit(q.cmd, "Snapshot", id, nil)
}

// execRevertSnapshot runs SnapshotManagerImpl.revertSnapshot: the volume
// must be Ready and, when attached, its VM Stopped; the volume's data and
// size become the snapshot's; execMu is held.
func (s *Sim) execRevertSnapshot(j *job) (map[string]any, *apiError) {
	s.mu.Lock()
	sn := s.st.Snapshots[j.InstanceID]
	v := s.st.Volumes[sn.VolumeID]
	var aerr *apiError
	switch {
	case v.Removed || v.State != volReady:
		aerr = errParam("The volume is not in Ready state.")
	case v.VMID != "" && s.st.VMStates[v.VMID] != vmStopped:
		aerr = errParam("The VM the specified disk is attached to is not in the shutdown state.")
	case sn.State != snapBackedUp || sn.File == "":
		aerr = errInternal("snapshot %s [%s] does not exists in data store", sn.Name, sn.ID)
	}
	file, oldSize := sn.File, v.Size
	s.mu.Unlock()
	if aerr != nil {
		return nil, aerr
	}
	backing, err := s.ensureBacking(v)
	if err == nil {
		s.flushLoop(v)
		err = overwriteFile(file, backing)
	}
	if err != nil {
		return nil, errInternal("Failed to revert snapshot %s: %v", sn.ID, err)
	}
	s.flushLoop(v)
	if sn.Size != oldSize {
		s.setLoopCapacity(v)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v.Size = sn.Size
	return map[string]any{"snapshot": s.snapshotJSON(sn)}, nil
}

// setLoopCapacity makes the volume's loop device, if it has one, take its
// backing file's size (the kernel sends `change`); execMu is held.
func (s *Sim) setLoopCapacity(v *volume) {
	s.mu.Lock()
	dev := v.LoopDevice
	s.mu.Unlock()
	if dev == "" || s.loops == nil {
		return
	}
	if err := s.loops.resize(dev); err != nil {
		s.log.Warn("set loop device capacity", "volume", v.ID, "device", dev, "err", err.Error())
	}
}

// snapshotJSON renders a snapshot as CloudStack's SnapshotResponse; s.mu
// is held.
func (s *Sim) snapshotJSON(sn *snapshot) map[string]any {
	v := s.st.Volumes[sn.VolumeID]
	zone, _ := s.inv.zone(v.ZoneID)
	m := map[string]any{
		"id": sn.ID, "name": sn.Name, "volumeid": v.ID, "volumename": v.Name, "volumetype": v.Type,
		"volumestate": v.State, "snapshottype": "MANUAL", "intervaltype": "MANUAL", "account": accountName,
		"domainid": domainID, "domain": domainName, "created": sn.Created.Format(timeLayout), "state": sn.State,
		"virtualsize": sn.Size, "physicalsize": 0, "zoneid": v.ZoneID, "zonename": zone.Name,
		"locationtype": "SECONDARY", "revertable": sn.State == snapBackedUp, "hasannotations": false,
		"tags": s.tagsJSON(tagSnapshot, sn.ID),
	}
	if sn.State == snapBackedUp {
		m["physicalsize"] = sn.Size
	}
	return m
}

// execCreateVolume finishes a createVolume job: a volume from a snapshot
// gets a copy of the snapshot's data and is Ready; execMu is held.
func (s *Sim) execCreateVolume(j *job) (map[string]any, *apiError) {
	s.mu.Lock()
	v := s.st.Volumes[j.InstanceID]
	var file string
	if v.SnapshotID != "" {
		file = s.st.Snapshots[v.SnapshotID].File
	}
	fromSnapshot, seq := v.SnapshotID != "" && v.State == volAllocated, v.Seq
	s.mu.Unlock()
	if fromSnapshot {
		if file == "" {
			return nil, errInternal("Failed to create volume: %d", seq)
		}
		backing := filepath.Join(s.cfg.StateDir, disksDir, backingName(v.ID, s.cfg.AnonymousBackingFiles))
		err := cloneFile(file, backing)
		if err == nil {
			err = truncateUp(backing, v.Size)
		}
		if err != nil {
			_ = removeFile(backing)
			return nil, errInternal("Failed to create volume: %d: %v", seq, err)
		}
		s.mu.Lock()
		v.BackingFile, v.State = backing, volReady
		s.mu.Unlock()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return map[string]any{"volume": s.volumeJSON(v)}, nil
}

// createFromSnapshot checks createVolume's snapshot parameters as
// VolumeApiServiceImpl.allocVolume does and returns the new volume's zone,
// offering and size in bytes; s.mu is held.
func (s *Sim) createFromSnapshot(snapID, zoneID, offID string, sizeBytes int64) (string, string, int64, *apiError) {
	sn := s.st.Snapshots[snapID]
	parent := s.st.Volumes[sn.VolumeID]
	if offID != "" && parent.Type != typeRoot {
		return "", "", 0, errParam("Disk Offering ID cannot be passed whilst creating volume from snapshot other than ROOT disk snapshots")
	}
	if sn.State != snapBackedUp {
		return "", "", 0, errParam("Snapshot id=%d is not in BackedUp state yet and can't be used for volume creation", sn.Seq)
	}
	if zoneID == "" {
		zoneID = parent.ZoneID
	}
	if offID == "" {
		return zoneID, parent.OfferingID, sn.Size, nil
	}
	if sizeBytes < sn.Size {
		return "", "", 0, errParam("Invalid size for volume creation: %dGB, snapshot size is: %dGB", sizeBytes>>30, sn.Size>>30)
	}
	return zoneID, offID, sizeBytes, nil
}

// volumeSnapshotsPending reports whether a volume has a snapshot still
// being taken; s.mu is held.
func (s *Sim) volumeSnapshotsPending(volID string) bool {
	for _, sn := range s.st.Snapshots {
		if sn.VolumeID == volID && sn.State == snapCreating {
			return true
		}
	}
	return false
}
