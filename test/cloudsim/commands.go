package cloudsim

import (
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
)

// Fixed account fields, as in the recorded samples.
const (
	accountName = "admin"
	domainID    = "2578d517-06f3-11ec-aa0b-1e00d000026f"
	domainName  = "ROOT"
	storageName = "primary-nfs"
	storageID   = "4f324b33-7d7d-3a06-9332-d0ebc71774d1"
)

// existence checks for request.uuid; callers hold no lock.
func (s *Sim) volumeExists(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.st.Volumes[id]
	return ok
}

func (s *Sim) vmExists(id string) bool   { _, ok := s.inv.vm(id); return ok }
func (s *Sim) zoneExists(id string) bool { _, ok := s.inv.zone(id); return ok }
func (s *Sim) offeringExists(id string) bool {
	_, ok := s.inv.offering(id)
	return ok
}

func (s *Sim) jobExists(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.st.Jobs[id]
	return ok
}

// createVolume allocates a volume, from a disk offering or a snapshot,
// with VolumeApiServiceImpl.allocVolume's checks; the job makes it (a
// volume from a snapshot gets the snapshot's data and is Ready).
func (s *Sim) createVolume(q request) (any, *apiError) {
	offID, aerr := q.uuid("diskofferingid", s.offeringExists)
	if aerr != nil {
		return nil, aerr
	}
	zoneID, aerr := q.uuid("zoneid", s.zoneExists)
	if aerr != nil {
		return nil, aerr
	}
	snapID, aerr := q.uuid("snapshotid", s.snapshotExists)
	if aerr != nil {
		return nil, aerr
	}
	size, aerr := q.int("size")
	if aerr != nil {
		return nil, aerr
	}
	if offID == "" && snapID == "" {
		return nil, errParam("At least one of disk Offering ID or snapshot ID must be passed whilst creating volume")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var sizeBytes int64
	if offID != "" {
		if snapID != "" {
			if sn := s.st.Snapshots[snapID]; s.st.Volumes[sn.VolumeID].Type != typeRoot {
				return nil, errParam("Disk Offering ID cannot be passed whilst creating volume from snapshot other than ROOT disk snapshots")
			}
		}
		if size != nil && *size <= 0 {
			return nil, errParam("Disk size must be larger than 0")
		}
		off, _ := s.inv.offering(offID)
		switch {
		case off.Custom && size == nil:
			return nil, errParam("This disk offering requires a custom size specified")
		case off.Custom && (*size < customSizeMinGB || *size > customSizeMaxGB):
			return nil, errParam("Volume size: %d GB is out of allowed range. Min: %d. Max: %d", *size, customSizeMinGB, customSizeMaxGB)
		case !off.Custom && size != nil:
			return nil, errParam("This disk offering does not allow custom size")
		case off.Custom:
			sizeBytes = *size << 30
		default:
			sizeBytes = off.SizeGB << 30
		}
	}
	if snapID != "" {
		if zoneID, offID, sizeBytes, aerr = s.createFromSnapshot(snapID, zoneID, offID, sizeBytes); aerr != nil {
			return nil, aerr
		}
	}
	if zoneID == "" {
		return nil, errParam("Please specify a valid zone.")
	}
	id := uuid.NewString()
	name := q.str("name")
	if name == "" {
		name = "DATA-" + id[:8]
	}
	s.st.NextSeq++
	s.st.Volumes[id] = &volume{ID: id, Seq: s.st.NextSeq, Name: name, ZoneID: zoneID, Type: typeData,
		Size: sizeBytes, OfferingID: offID, State: volAllocated, Created: time.Now().UTC(), SnapshotID: snapID}
	j, aerr := s.newJob(q.cmd, "Volume", id, nil)
	if aerr != nil {
		delete(s.st.Volumes, id)
		return nil, aerr
	}
	return map[string]any{"id": id, "jobid": j.ID}, nil
}

func (s *Sim) attachVolume(q request) (any, *apiError) {
	return s.volumeVMJob(q, request.required)
}

func (s *Sim) detachVolume(q request) (any, *apiError) {
	return s.volumeVMJob(q, request.uuid)
}

// volumeVMJob checks id and virtualmachineid with param (mandatory for
// attach, optional for detach) and deviceid, then submits the job.
func (s *Sim) volumeVMJob(q request, param func(request, string, func(string) bool) (string, *apiError)) (any, *apiError) {
	volID, aerr := param(q, "id", s.volumeExists)
	if aerr != nil {
		return nil, aerr
	}
	vmID, aerr := param(q, "virtualmachineid", s.vmExists)
	if aerr != nil {
		return nil, aerr
	}
	if _, aerr := q.int("deviceid"); aerr != nil {
		return nil, aerr
	}
	params := map[string]string{"id": volID, "virtualmachineid": vmID, "deviceid": q.str("deviceid")}
	return s.submit(q.cmd, "Volume", volID, params)
}

// submit creates a job and answers {"jobid"}.
func (s *Sim) submit(cmd, instType, instID string, params map[string]string) (any, *apiError) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, aerr := s.newJob(cmd, instType, instID, params)
	if aerr != nil {
		return nil, aerr
	}
	return map[string]any{"jobid": j.ID}, nil
}

func (s *Sim) deleteVolume(q request) (any, *apiError) {
	volID, aerr := q.required("id", s.volumeExists)
	if aerr != nil {
		return nil, aerr
	}
	s.execMu.Lock()
	defer s.execMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.st.Volumes[volID]
	switch {
	case v.Removed:
		return nil, errParam("Unable to find volume with ID: %s", volID)
	case v.VMID != "":
		return nil, errParam("Please specify a volume that is not attached to any VM.")
	}
	if v.BackingFile != "" {
		if err := removeFile(v.BackingFile); err != nil {
			return nil, errInternal("Failed to delete volume %s: %v", volID, err)
		}
		v.BackingFile = ""
	}
	v.Removed = true
	s.st.Tags = slices.DeleteFunc(s.st.Tags, func(t resourceTag) bool { return t.ResourceType == tagVolume && t.ResourceID == volID })
	if err := s.st.save(s.cfg.StateDir); err != nil {
		return nil, errInternal("Failed to delete volume %s: %v", volID, err)
	}
	return map[string]any{"success": true}, nil
}

// page applies CloudStack's page/pagesize to n items: the [lo, hi) range.
func page(q request, n int) (int, int, *apiError) {
	p, aerr := q.int("page")
	if aerr != nil {
		return 0, 0, aerr
	}
	ps, aerr := q.int("pagesize")
	if aerr != nil {
		return 0, 0, aerr
	}
	if p == nil && ps == nil {
		return 0, n, nil
	}
	pg, size := int64(1), int64(500)
	if p != nil {
		pg = *p
	}
	if ps != nil {
		size = *ps
	}
	if pg < 1 || size < 1 {
		return 0, 0, errParam("Page and page size must be greater than 0")
	}
	lo := min(int64(n), (pg-1)*size)
	return int(lo), int(min(int64(n), lo+size)), nil
}

// listAnswer is CloudStack's list shape: {} when empty, else count + items.
func listAnswer(q request, key string, items []map[string]any) (any, *apiError) {
	return listPage(q, key, items, func(m map[string]any) map[string]any { return m })
}

// listPage is listAnswer of the items that toJSON makes of the page of
// all that q asks for: a page costs its own items, not the whole list's.
func listPage[T any](q request, key string, all []T, toJSON func(T) map[string]any) (any, *apiError) {
	if len(all) == 0 {
		return map[string]any{}, nil
	}
	lo, hi, aerr := page(q, len(all))
	if aerr != nil {
		return nil, aerr
	}
	out := map[string]any{"count": len(all)}
	if hi > lo {
		items := make([]map[string]any, 0, hi-lo)
		for _, it := range all[lo:hi] {
			items = append(items, toJSON(it))
		}
		out[key] = items
	}
	return out, nil
}

func (s *Sim) listVolumes(q request) (any, *apiError) {
	id, aerr := q.uuid("id", s.volumeExists)
	if aerr != nil {
		return nil, aerr
	}
	vmID, aerr := q.uuid("virtualmachineid", s.vmExists)
	if aerr != nil {
		return nil, aerr
	}
	zoneID, aerr := q.uuid("zoneid", s.zoneExists)
	if aerr != nil {
		return nil, aerr
	}
	typ, name, state := q.str("type"), q.str("name"), q.str("state")
	tags := q.tags("tags")
	s.mu.Lock()
	defer s.mu.Unlock()
	var vols []*volume
	for _, v := range s.st.Volumes {
		if v.Removed || (id != "" && v.ID != id) || (vmID != "" && v.VMID != vmID) ||
			(zoneID != "" && v.ZoneID != zoneID) || (typ != "" && !strings.EqualFold(v.Type, typ)) ||
			(name != "" && v.Name != name) || (state != "" && !strings.EqualFold(v.State, state)) ||
			(len(tags) > 0 && !s.hasAnyTag(tagVolume, v.ID, tags)) {
			continue
		}
		vols = append(vols, v)
	}
	slices.SortFunc(vols, func(a, b *volume) int { return int(a.Seq - b.Seq) })
	return listPage(q, "volume", vols, s.volumeJSON)
}

func (s *Sim) listVirtualMachines(q request) (any, *apiError) {
	id, aerr := q.uuid("id", s.vmExists)
	if aerr != nil {
		return nil, aerr
	}
	zoneID, aerr := q.uuid("zoneid", s.zoneExists)
	if aerr != nil {
		return nil, aerr
	}
	state := q.str("state")
	s.mu.Lock()
	defer s.mu.Unlock()
	var vms []VM
	for _, vm := range s.inv.VMs {
		if (id != "" && vm.ID != id) || (zoneID != "" && vm.ZoneID != zoneID) ||
			(state != "" && !strings.EqualFold(s.st.VMStates[vm.ID], state)) {
			continue
		}
		vms = append(vms, vm)
	}
	return listPage(q, "virtualmachine", vms, s.vmJSON)
}

func (s *Sim) listZones(q request) (any, *apiError) {
	id, aerr := q.uuid("id", s.zoneExists)
	if aerr != nil {
		return nil, aerr
	}
	var items []map[string]any
	for _, z := range s.inv.Zones {
		if (id != "" && z.ID != id) || (q.str("name") != "" && z.Name != q.str("name")) {
			continue
		}
		items = append(items, map[string]any{"id": z.ID, "name": z.Name, "networktype": "Advanced",
			"allocationstate": "Enabled", "localstorageenabled": false,
			"tags": []any{}})
	}
	return listAnswer(q, "zone", items)
}

func (s *Sim) listDiskOfferings(q request) (any, *apiError) {
	id, aerr := q.uuid("id", s.offeringExists)
	if aerr != nil {
		return nil, aerr
	}
	var items []map[string]any
	for _, o := range s.inv.DiskOfferings {
		if (id != "" && o.ID != id) || (q.str("name") != "" && o.Name != q.str("name")) {
			continue
		}
		items = append(items, map[string]any{"id": o.ID, "name": o.Name, "displaytext": o.Name,
			"disksize": o.SizeGB, "iscustomized": o.Custom, "storagetype": "shared",
			"provisioningtype": "thin", "cacheMode": "none", "displayoffering": true,
			"created": "2025-01-01T00:00:00+0000"})
	}
	return listAnswer(q, "diskoffering", items)
}

func (s *Sim) queryAsyncJobResult(q request) (any, *apiError) {
	id, aerr := q.required("jobid", s.jobExists)
	if aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return jobJSON(s.st.Jobs[id]), nil
}

func (s *Sim) startVirtualMachine(q request) (any, *apiError) {
	return s.vmPower(q, vmRunning, "Starting")
}

func (s *Sim) stopVirtualMachine(q request) (any, *apiError) {
	return s.vmPower(q, vmStopped, "Stopping")
}

// vmPower submits a start or stop job; a VM not already in the target
// state is in the transitional state until the job ends.
func (s *Sim) vmPower(q request, target, transition string) (any, *apiError) {
	id, aerr := q.required("id", s.vmExists)
	if aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.st.VMStates[id]
	if prev != target {
		s.st.VMStates[id] = transition
	}
	j, aerr := s.newJob(q.cmd, "VirtualMachine", id, map[string]string{"previous": prev, "forced": q.str("forced")})
	if aerr != nil {
		s.st.VMStates[id] = prev
		return nil, aerr
	}
	return map[string]any{"jobid": j.ID}, nil
}

func (s *Sim) listCapabilities(request) (any, *apiError) {
	return map[string]any{"capability": map[string]any{
		"cloudstackversion": "4.20.1.0-cloudsim", "customdiskofferingmaxsize": 1024,
		"customdiskofferingminsize": 1, "kvmsnapshotenabled": true, "apilimitinterval": 1,
		"apilimitmax": 0, "allowusercreateprojects": true, "supportELB": "false",
	}}, nil
}

// volumeJSON renders a volume as CloudStack does; s.mu is held.
func (s *Sim) volumeJSON(v *volume) map[string]any {
	zone, _ := s.inv.zone(v.ZoneID)
	m := map[string]any{
		"id": v.ID, "name": v.Name, "zoneid": v.ZoneID, "zonename": zone.Name, "type": v.Type,
		"provisioningtype": "thin", "size": v.Size, "created": v.Created.Format(timeLayout),
		"state": v.State, "account": accountName, "domainid": domainID, "domain": domainName,
		"storagetype": "shared", "hypervisor": "None", "destroyed": false, "isextractable": true,
		"displayvolume": true, "quiescevm": false, "supportsstoragesnapshot": false,
		"tags": s.tagsJSON(tagVolume, v.ID), "deleteprotection": false,
	}
	if v.SnapshotID != "" {
		m["snapshotid"] = v.SnapshotID
	}
	if off, ok := s.inv.offering(v.OfferingID); ok {
		m["diskofferingid"], m["diskofferingname"], m["diskofferingdisplaytext"] = off.ID, off.Name, off.Name
	}
	if v.State != volAllocated { // created on primary storage
		m["hypervisor"] = "KVM"
		m["storage"], m["storageid"], m["path"] = storageName, storageID, v.ID
		m["physicalsize"], m["virtualsize"] = 197120, v.Size
	}
	if v.VMID != "" {
		vm, _ := s.inv.vm(v.VMID)
		m["virtualmachineid"], m["vmname"], m["vmdisplayname"] = vm.ID, vm.Name, vm.Name
		m["vmstate"], m["vmtype"] = s.st.VMStates[vm.ID], "User"
		m["deviceid"] = *v.DeviceID
		m["attached"] = v.Attached.Format(timeLayout)
	}
	return m
}

// vmJSON renders a VM; s.mu is held.
func (s *Sim) vmJSON(vm VM) map[string]any {
	zone, _ := s.inv.zone(vm.ZoneID)
	return map[string]any{
		"id": vm.ID, "name": vm.Name, "displayname": vm.Name, "account": accountName,
		"domainid": domainID, "domain": domainName, "created": "2025-01-01T00:00:00+0000",
		"state": s.st.VMStates[vm.ID], "haenable": false, "zoneid": vm.ZoneID, "zonename": zone.Name,
		"hypervisor": "KVM", "instancename": instanceName(vm), "cpunumber": 2, "cpuspeed": 2000,
		"memory": 4096, "rootdeviceid": 0, "rootdevicetype": "ROOT", "displayvm": true,
		"isdynamicallyscalable": false, "details": map[string]string{}, "tags": []any{},
		"securitygroup": []any{}, "affinitygroup": []any{}, "nic": []any{},
	}
}

// instanceName is the VM's hypervisor name.
func instanceName(vm VM) string { return "i-2-" + vm.ID[:4] + "-VM" }
