package csfake

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/csapi"
)

// Volume states while a snapshot or resize job runs.
const (
	Snapshotting = "Snapshotting"
	Resizing     = "Resizing"
)

// Snapshot states.
const (
	SnapshotCreating  = "Creating"
	SnapshotBackedUp  = csapi.SnapshotBackedUp
	SnapshotError     = csapi.SnapshotError
	SnapshotDestroyed = "Destroyed"
)

// CloudStack's custom-size range (listCapabilities' defaults) and
// maximum volume size.
const (
	customMinGiB = 1
	customMaxGiB = 1024
	maxSizeGiB   = 2000
)

// tagVolume is the resource type of volume tags.
const tagVolume = "Volume"

// snapshot is a stored snapshot.
type snapshot struct {
	id, name, volumeID, state string
	seq, size                 int64
	created                   time.Time
}

// tag is a resource tag.
type tag struct{ key, value string }

// tagMap renders tags as csapi.Volume.Tags does: nil when none.
func tagMap(tags []tag) map[string]string {
	if len(tags) == 0 {
		return nil
	}
	m := make(map[string]string, len(tags))
	for _, t := range tags {
		m[t.key] = t.value
	}
	return m
}

// hasTags reports whether tags hold every one of want, without case.
func hasTags(tags []tag, want map[string]string) bool {
	for k, v := range want {
		if !slices.ContainsFunc(tags, func(t tag) bool { return strings.EqualFold(t.key, k) && strings.EqualFold(t.value, v) }) {
			return false
		}
	}
	return true
}

// sortedKeys is the order cloudstack-go sends a map's tags in.
func sortedKeys(m map[string]string) []string { return slices.Sorted(maps.Keys(m)) }

// snapView renders a snapshot as the real client returns it; c.mu is held.
func (c *Cloud) snapView(s *snapshot) csapi.Snapshot {
	return csapi.Snapshot{ID: s.id, Name: s.name, VolumeID: s.volumeID, State: s.state, Size: s.size,
		ZoneID: c.volumes[s.volumeID].zoneID, Created: s.created.Format(csapi.TimeLayout)}
}

// readyAgain makes a volume in the transitional state Ready; c.mu is held.
func readyAgain(v *volume, transitional string) {
	if v.state == transitional {
		v.state = Ready
	}
}

// ResizeVolume submits a resize; its job runs CloudStack's checks. A
// Ready volume is Resizing until the job ends.
func (c *Cloud) ResizeVolume(ctx context.Context, volumeID string, sizeGiB int64, shrinkOK bool) (string, error) {
	return call(ctx, c, CmdResizeVolume, func(f Fault) (string, error) {
		v, err := c.volumeParam(CmdResizeVolume, volumeID)
		if err != nil {
			return "", err
		}
		own := v.state == Ready && !v.removed
		if own {
			v.state = Resizing
		}
		undo := func() {
			if own {
				readyAgain(v, Resizing)
			}
		}
		return c.submitUndo(CmdResizeVolume, f, func() (result, *csapi.Error) {
			undo()
			return volumeResult(c.resize(v, sizeGiB, shrinkOK))
		}, undo), nil
	})
}

// resize runs a resize job; c.mu is held.
func (c *Cloud) resize(v *volume, sizeGiB int64, shrinkOK bool) (*csapi.Volume, *csapi.Error) {
	const cmd = CmdResizeVolume
	off, _ := c.offering(v.offeringID)
	switch {
	case v.removed:
		return nil, jobFailure(cmd, 431, "No such volume")
	case slices.ContainsFunc(slices.Collect(maps.Values(c.snaps)), func(s *snapshot) bool {
		return s.volumeID == v.id && s.state == SnapshotCreating
	}):
		return nil, jobFailure(cmd, 530, "There is/are unbacked up snapshot(s) on this volume, resize volume is not permitted, please try again later.")
	case v.state != Ready && v.state != Allocated:
		return nil, jobFailure(cmd, 431, "Volume should be in ready or allocated state before attempting a resize. Volume %s is in state %s.", v.id, v.state)
	case off.Custom && (sizeGiB < customMinGiB || sizeGiB > customMaxGiB):
		return nil, jobFailure(cmd, 431, "Volume size: %d GB is out of allowed range. Min: %d. Max: %d", sizeGiB, customMinGiB, customMaxGiB)
	}
	size := sizeGiB << 30
	if size != v.size {
		switch {
		case size < 1<<30:
			return nil, jobFailure(cmd, 431, "Please specify a size of at least 1 GB.")
		case sizeGiB > maxSizeGiB:
			return nil, jobFailure(cmd, 431, "Requested volume size is %.2f TB, but the maximum size allowed is %d GB.", float64(size)/(1<<40), maxSizeGiB)
		case size < v.size && !shrinkOK:
			return nil, jobFailure(cmd, 431, "Going from existing size of %d to size of %d would shrink the volume."+
				"Need to sign off by supplying the shrinkok parameter with value of true.", v.size, size)
		}
	}
	v.size = size
	out := c.view(v)
	return &out, nil
}

// QuiesceRefused is the text of the failed createSnapshot job of a
// quiesced snapshot of volumeID.
func QuiesceRefused(volumeID string) string {
	return "Failed to create snapshot due to an internal error creating snapshot for volume " + volumeID
}

// CreateSnapshot allocates a snapshot of a Ready volume; its job backs it
// up (a failed job leaves it in Error). A quiesced one's job fails with
// 530, as CloudStack's default snapshot strategy refuses quiescevm.
func (c *Cloud) CreateSnapshot(ctx context.Context, p csapi.SnapshotParams) (string, string, error) {
	volumeID, name := p.VolumeID, p.Name
	r, err := call(ctx, c, CmdCreateSnapshot, func(f Fault) (created, error) {
		if volumeID == "" {
			return created{}, missing(CmdCreateSnapshot, "volumeid")
		}
		v, ok := c.volumes[volumeID]
		switch {
		case !ok:
			return created{}, notFound(CmdCreateSnapshot, "volumeid", volumeID)
		case v.removed:
			return created{}, paramError(CmdCreateSnapshot, "Creating snapshot failed due to volume:%d doesn't exist", v.seq)
		case v.state != Ready:
			return created{}, paramError(CmdCreateSnapshot, "VolumeId: %d is not in Ready state but %s. Cannot take snapshot.", v.seq, v.state)
		}
		now := time.Now().UTC().Truncate(time.Second)
		if name == "" {
			vmName := "detached"
			if vm, ok := c.vm(v.vmID); ok {
				vmName = vm.Name
			}
			name = vmName + "_" + v.name + "_" + now.Format("20060102150405")
		}
		c.seq++
		s := &snapshot{id: uuid.NewString(), name: name, volumeID: v.id, state: SnapshotCreating, seq: c.seq, size: v.size, created: now}
		c.snaps[s.id] = s
		v.state = Snapshotting // until the job ends
		jobID := c.submitUndo(CmdCreateSnapshot, f, func() (result, *csapi.Error) {
			readyAgain(v, Snapshotting)
			if v.removed {
				s.state = SnapshotError
				return result{}, jobFailure(CmdCreateSnapshot, 431, "Creating snapshot failed due to volume:%d doesn't exist", v.seq)
			}
			if p.Quiesce {
				s.state = SnapshotError
				return result{}, jobFailure(CmdCreateSnapshot, 530, "%s", QuiesceRefused(v.id))
			}
			s.state, s.size = SnapshotBackedUp, v.size
			out := c.snapView(s)
			return result{snapshot: &out}, nil
		}, func() { s.state = SnapshotError; readyAgain(v, Snapshotting) })
		return created{s.id, jobID}, nil
	})
	return r.volumeID, r.jobID, err
}

// ListSnapshots lists the snapshots f selects, newest first; an unknown
// id is an error wrapping csapi.ErrNotFound.
func (c *Cloud) ListSnapshots(ctx context.Context, f csapi.SnapshotFilter) ([]csapi.Snapshot, error) {
	return call(ctx, c, CmdListSnapshots, func(Fault) ([]csapi.Snapshot, error) {
		if _, ok := c.snaps[f.ID]; f.ID != "" && !ok {
			return nil, notFound(CmdListSnapshots, "id", f.ID)
		}
		if _, ok := c.volumes[f.VolumeID]; f.VolumeID != "" && !ok {
			return nil, notFound(CmdListSnapshots, "volumeid", f.VolumeID)
		}
		snaps := slices.Collect(maps.Values(c.snaps))
		slices.SortFunc(snaps, func(a, b *snapshot) int { return int(b.seq - a.seq) })
		var out []csapi.Snapshot
		for _, s := range snaps {
			if s.state == SnapshotDestroyed || (f.ID != "" && s.id != f.ID) || (f.VolumeID != "" && s.volumeID != f.VolumeID) ||
				(f.Name != "" && s.name != f.Name) {
				continue
			}
			out = append(out, c.snapView(s))
		}
		return out, nil
	})
}

// GetSnapshot returns a snapshot; a deleted or unknown one is an error
// wrapping csapi.ErrNotFound.
func (c *Cloud) GetSnapshot(ctx context.Context, snapshotID string) (csapi.Snapshot, error) {
	snaps, err := c.ListSnapshots(ctx, csapi.SnapshotFilter{ID: snapshotID})
	if err != nil {
		return csapi.Snapshot{}, err
	}
	if len(snaps) != 1 {
		return csapi.Snapshot{}, fmt.Errorf("cloudstack listSnapshots: snapshot %s (%d listed): %w", snapshotID, len(snaps), csapi.ErrNotFound)
	}
	return snaps[0], nil
}

// snapParam resolves the mandatory snapshot id of command; c.mu is held.
func (c *Cloud) snapParam(command, id string) (*snapshot, error) {
	if id == "" {
		return nil, missing(command, "id")
	}
	s, ok := c.snaps[id]
	if !ok {
		return nil, notFound(command, "id", id)
	}
	return s, nil
}

// DeleteSnapshot submits a delete; its job destroys the snapshot.
func (c *Cloud) DeleteSnapshot(ctx context.Context, snapshotID string) (string, error) {
	return call(ctx, c, CmdDeleteSnapshot, func(f Fault) (string, error) {
		s, err := c.snapParam(CmdDeleteSnapshot, snapshotID)
		if err != nil {
			return "", err
		}
		return c.submit(CmdDeleteSnapshot, f, func() (result, *csapi.Error) {
			switch s.state {
			case SnapshotDestroyed:
				return result{}, jobFailure(CmdDeleteSnapshot, 431, "Snapshot with id: %d is already destroyed", s.seq)
			case SnapshotBackedUp, SnapshotError:
			default:
				return result{}, jobFailure(CmdDeleteSnapshot, 530, "Failed to delete snapshot:com.cloud.exception.InvalidParameterValueException: "+
					"Can't delete snapshotshot %d due to it is in %s Status", s.seq, s.state)
			}
			s.state = SnapshotDestroyed
			return result{}, nil
		}), nil
	})
}

// RevertSnapshot submits a revert; its job runs CloudStack's checks and
// gives the volume the snapshot's size.
func (c *Cloud) RevertSnapshot(ctx context.Context, snapshotID string) (string, error) {
	return call(ctx, c, CmdRevertSnapshot, func(f Fault) (string, error) {
		s, err := c.snapParam(CmdRevertSnapshot, snapshotID)
		if err != nil {
			return "", err
		}
		return c.submit(CmdRevertSnapshot, f, func() (result, *csapi.Error) {
			v := c.volumes[s.volumeID]
			switch {
			case v.removed || v.state != Ready:
				return result{}, jobFailure(CmdRevertSnapshot, 431, "The volume is not in Ready state.")
			case v.vmID != "" && c.vmStates[v.vmID] != Stopped:
				return result{}, jobFailure(CmdRevertSnapshot, 431, "The VM the specified disk is attached to is not in the shutdown state.")
			case s.state != SnapshotBackedUp:
				return result{}, jobFailure(CmdRevertSnapshot, 530, "snapshot %s [%s] does not exists in data store", s.name, s.id)
			}
			v.size = s.size
			out := c.snapView(s)
			return result{snapshot: &out}, nil
		}), nil
	})
}

// CreateTags submits tags for a volume; its job adds all or none.
func (c *Cloud) CreateTags(ctx context.Context, volumeID string, tags map[string]string) (string, error) {
	return call(ctx, c, CmdCreateTags, func(f Fault) (string, error) {
		switch {
		case volumeID == "":
			return "", missing(CmdCreateTags, "resourceids")
		case len(tags) == 0:
			return "", missing(CmdCreateTags, "tags")
		}
		return c.submit(CmdCreateTags, f, func() (result, *csapi.Error) {
			v, ok := c.volumes[volumeID]
			var add []tag
			for _, k := range sortedKeys(tags) {
				switch {
				case !ok || v.removed:
					return result{}, jobFailure(CmdCreateTags, 431, "Unable to find resource by uuid %s and type %s", volumeID, tagVolume)
				case tags[k] == "":
					return result{}, jobFailure(CmdCreateTags, 431, "Value for the key %s is either null or empty", k)
				case slices.ContainsFunc(append(slices.Clone(v.tags), add...), func(t tag) bool { return strings.EqualFold(t.key, k) }):
					return result{}, jobFailure(CmdCreateTags, 530, "tag %s already on %s with id %s", k, tagVolume, volumeID)
				}
				add = append(add, tag{k, tags[k]})
			}
			v.tags = append(v.tags, add...)
			return result{}, nil
		}), nil
	})
}

// DeleteTags submits the removal of tags from a volume; its job fails if
// none of them is there. It refuses an empty set, as the real client does.
func (c *Cloud) DeleteTags(ctx context.Context, volumeID string, tags map[string]string) (string, error) {
	if len(tags) == 0 {
		return "", csapi.ErrNoTags
	}
	return call(ctx, c, CmdDeleteTags, func(f Fault) (string, error) {
		if volumeID == "" {
			return "", missing(CmdDeleteTags, "resourceids")
		}
		return c.submit(CmdDeleteTags, f, func() (result, *csapi.Error) {
			v, ok := c.volumes[volumeID]
			if !ok {
				return result{}, jobFailure(CmdDeleteTags, 530, "Failed to delete tags")
			}
			kept := slices.DeleteFunc(slices.Clone(v.tags), func(t tag) bool {
				for k, val := range tags {
					if strings.EqualFold(t.key, k) && (val == "" || strings.EqualFold(t.value, val)) {
						return true
					}
				}
				return false
			})
			if len(kept) == len(v.tags) {
				return result{}, jobFailure(CmdDeleteTags, 530, "Failed to delete tags")
			}
			v.tags = kept
			return result{}, nil
		}), nil
	})
}

// StartVM submits a start: the VM is Starting until its job ends; a
// Running VM or one without a root disk is refused in the job.
func (c *Cloud) StartVM(ctx context.Context, vmID string) (string, error) {
	return c.power(ctx, CmdStartVM, vmID, Running, "Starting")
}

// StopVM submits a stop: the VM is Stopping until its job ends; stopping
// a Stopped VM succeeds.
func (c *Cloud) StopVM(ctx context.Context, vmID string, _ bool) (string, error) {
	return c.power(ctx, CmdStopVM, vmID, Stopped, "Stopping")
}

// power submits a start or stop job.
func (c *Cloud) power(ctx context.Context, command, vmID, target, transition string) (string, error) {
	return call(ctx, c, command, func(f Fault) (string, error) {
		if vmID == "" {
			return "", missing(command, "id")
		}
		vm, ok := c.vm(vmID)
		if !ok {
			return "", notFound(command, "id", vmID)
		}
		prev := c.vmStates[vmID]
		if prev != target {
			c.vmStates[vmID] = transition
		}
		undo := func() { c.vmStates[vmID] = prev }
		return c.submitUndo(command, f, func() (result, *csapi.Error) {
			if command == CmdStartVM {
				switch {
				case prev == Running:
					undo()
					return result{}, jobFailure(command, 431, "The virtual machine %s (%s) is already running", vm.ID, vm.Name)
				case !c.hasRoot(vmID):
					undo()
					return result{}, jobFailure(command, 533, "Unable to create a deployment for VM[User|i-2-%s-VM]", vm.ID[:4])
				}
			}
			c.vmStates[vmID] = target
			out, _ := c.vm(vmID)
			return result{vm: &out}, nil
		}, undo), nil
	})
}

// hasRoot reports whether a volume is the VM's device 0; c.mu is held.
func (c *Cloud) hasRoot(vmID string) bool {
	for _, v := range c.volumes {
		if !v.removed && v.vmID == vmID && v.deviceID == 0 {
			return true
		}
	}
	return false
}
