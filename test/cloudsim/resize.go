package cloudsim

import (
	"fmt"
	"os"
	"strings"
)

// CloudStack's size limits (VolumeOrchestrationService defaults, as
// listCapabilities reports them).
const (
	customSizeMinGB = 1
	customSizeMaxGB = 1024
	maxVolumeSizeGB = 2000
)

func (s *Sim) resizeVolume(q request) (any, *apiError) {
	volID, aerr := q.required("id", s.volumeExists)
	if aerr != nil {
		return nil, aerr
	}
	offID, aerr := q.uuid("diskofferingid", s.offeringExists)
	if aerr != nil {
		return nil, aerr
	}
	if _, aerr := q.int("size"); aerr != nil {
		return nil, aerr
	}
	p := map[string]string{"size": q.str("size"), "shrinkok": q.str("shrinkok"), "diskofferingid": offID}
	s.mu.Lock()
	defer s.mu.Unlock()
	// A Ready volume is Resizing until the job ends (VolumeServiceImpl's
	// ResizeRequested); the job checks it as the Ready volume it was.
	v := s.st.Volumes[volID]
	if v.State == volReady && !v.Removed {
		v.State, p["resizing"] = volResizing, "true"
	}
	j, aerr := s.newJob(q.cmd, "Volume", volID, p)
	if aerr != nil {
		s.readyAgain(volID, volResizing)
		return nil, aerr
	}
	return map[string]any{"jobid": j.ID}, nil
}

// execResize runs VolumeApiServiceImpl.resizeVolume's checks (size in GiB
// on the volume's own offering), then truncates the backing file and sets
// the loop device's capacity, so the device on the VM's host changes size
// with a real `change` uevent; execMu is held.
func (s *Sim) execResize(j *job) (map[string]any, *apiError) {
	p := j.Params
	s.mu.Lock()
	v := s.st.Volumes[j.InstanceID]
	if p["resizing"] == "true" {
		s.readyAgain(v.ID, volResizing)
	}
	newSize, aerr := s.checkResize(v, parseOptInt(p["size"]), strings.EqualFold(p["shrinkok"], "true"), p["diskofferingid"])
	state, backing := v.State, v.BackingFile
	s.mu.Unlock()
	if aerr != nil {
		return nil, aerr
	}
	if state == volReady && backing != "" {
		if err := os.Truncate(backing, newSize); err != nil {
			return nil, errInternal("Failed to resize volume %s: %v", v.Name, err)
		}
		s.setLoopCapacity(v)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	v.Size = newSize
	return map[string]any{"volume": s.volumeJSON(v)}, nil
}

// checkResize returns the new size in bytes or CloudStack's refusal; s.mu
// is held.
func (s *Sim) checkResize(v *volume, sizeGB *int64, shrinkOK bool, newOffering string) (int64, *apiError) {
	switch {
	case v.Removed:
		return 0, errParam("No such volume")
	case s.volumeSnapshotsPending(v.ID):
		return 0, errInternal("There is/are unbacked up snapshot(s) on this volume, resize volume is not permitted, please try again later.")
	case v.State != volReady && v.State != volAllocated:
		return 0, errParam("Volume should be in ready or allocated state before attempting a resize. Volume %s is in state %s.", v.ID, v.State)
	case newOffering != "":
		return 0, errParam("cloudsim: resizeVolume with a new disk offering is not simulated")
	}
	newSize := v.Size
	if sizeGB != nil {
		if off, ok := s.inv.offering(v.OfferingID); ok && off.Custom && (*sizeGB < customSizeMinGB || *sizeGB > customSizeMaxGB) {
			return 0, errParam("Volume size: %d GB is out of allowed range. Min: %d. Max: %d", *sizeGB, customSizeMinGB, customSizeMaxGB)
		}
		newSize = *sizeGB << 30
	}
	if newSize == v.Size {
		return newSize, nil
	}
	switch {
	case newSize < 0 || (newSize > 0 && newSize < 1<<30):
		return 0, errParam("Please specify a size of at least 1 GB.")
	case newSize > maxVolumeSizeGB<<30:
		return 0, errParam("Requested volume size is %s, but the maximum size allowed is %d GB.", readableSize(newSize), maxVolumeSizeGB)
	case v.Size > newSize && !shrinkOK:
		return 0, errParam("Going from existing size of %d to size of %d would shrink the volume."+
			"Need to sign off by supplying the shrinkok parameter with value of true.", v.Size, newSize)
	}
	return newSize, nil
}

// readableSize is CloudStack's NumbersUtil.toReadableSize.
func readableSize(b int64) string {
	const k = 1024
	switch {
	case b < k:
		return fmt.Sprintf("%d bytes", b)
	case b < k*k:
		return fmt.Sprintf("%.2f KB", float64(b)/k)
	case b < k*k*k:
		return fmt.Sprintf("%.2f MB", float64(b)/(k*k))
	case b < k*k*k*k:
		return fmt.Sprintf("%.2f GB", float64(b)/(k*k*k))
	}
	return fmt.Sprintf("%.2f TB", float64(b)/(k*k*k*k))
}
