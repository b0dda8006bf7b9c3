package correlate

import (
	"context"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
)

// healLoop brings the mappings of the VMs queued by device events in line
// with their devices.
func (c *Correlator) healLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.ctx.Done():
			return
		case vm := <-c.healQ:
			ctx, cancel := context.WithTimeout(c.ctx, time.Minute)
			if err := c.heal(ctx, vm); err != nil && c.ctx.Err() == nil {
				c.log.Warn("heal", "vm_id", vm, "err", err)
			}
			cancel()
		}
	}
}

// heal marks missing each detected mapping of vm whose device is gone, and
// gives each missing mapping the device that came late: the one
// with the volume's identity or, while no Attached waits on the VM, the
// only fitting device without identity that appeared after the mapping was
// marked missing. Mappings being released (Detached) are left alone. A
// healed mapping is recorded, named and published on
// volumes.mappings.<volume_id>. A heal that compared every mapping with a
// list of the VM's devices, without error, ends the VM's start check.
func (c *Correlator) heal(ctx context.Context, vm string) error {
	ms, err := c.cfg.Store.ListMappings(ctx, vm)
	if err != nil {
		return fmt.Errorf("list mappings: %w", err)
	}
	c.mu.Lock()
	listed := c.table(vm).listed
	c.mu.Unlock()
	if !listed && len(ms) > 0 {
		// After a start or a gap in events, the table is filled by a list
		// before a mapping is called gone.
		if _, err := c.list(ctx, vm, requestTimeout); err != nil {
			c.log.Warn("heal: list devices", "vm_id", vm, "err", err)
		}
	}
	c.mu.Lock()
	listed = c.table(vm).listed
	c.mu.Unlock()
	var errs []error
	for _, m := range ms {
		c.mu.Lock()
		releasing := c.releasing[m.VolumeID] > 0
		c.mu.Unlock()
		if releasing {
			continue
		}
		if why := c.gone(vm, m); m.LinuxState == commands.LinuxDetected && why != "" {
			// Its device went away behind our back, or its name is another
			// disk now: the mapping must not point at it.
			if err := c.markMissing(ctx, m, why); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if m.LinuxState != commands.LinuxMissing || m.CloudStackState != commands.CloudStackAttached {
			continue
		}
		dev, how, ok := c.pick(m, time.Time{}, nil, byIdentity)
		if !ok {
			if dev, how, ok = c.pickLate(m, ms); !ok {
				continue
			}
		}
		healed, err := c.take(ctx, m, dev, how)
		if err == nil {
			c.hold(vm, dev.Identity(), m.VolumeID)
			healed, err = c.record(ctx, healed)
		}
		c.unclaim(vm, dev.Identity(), m.VolumeID)
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %s: %w", m.VolumeID, err))
			continue
		}
		c.log.Info("mapping healed by a late device", "vm_id", vm, "volume_id", m.VolumeID,
			"device", healed.DevicePath, "match", how.String())
	}
	if (listed || len(ms) == 0) && len(errs) == 0 {
		c.checked(vm) // every mapping of vm was compared with its devices
	}
	return errors.Join(errs...)
}

// gone says why the VM's device table does not hold m's disk ("" when it
// does): its name with its recorded identity, not carrying another
// volume's kernel identity (diskseqs start again at each boot: after a
// reboot another volume's disk can show the recorded identity). A table
// not filled by a list since the last start, gap in events or event
// contradicting the list knows too little: nothing is called gone.
func (c *Correlator) gone(vm string, m commands.Mapping) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.vms[vm]
	if t == nil || !t.listed {
		return ""
	}
	d, ok := t.devices[path.Base(m.DevicePath)]
	switch {
	case !ok || d.Path != m.DevicePath:
		return "device removed"
	case !sameDisk(m, d):
		return "its device name is disk " + d.Identity().String() + " now"
	case devagent.HasIdentity(d) && !devagent.MatchesVolume(d, m.VolumeID):
		return "its disk carries another volume's identity"
	}
	return ""
}

// pickLate claims the device without identity for a missing mapping m when
// it is unambiguous: no Attached waits on the VM, exactly one such device
// of m's size appeared after m was marked missing, and no other missing
// mapping of the VM (in ms) has that size.
func (c *Correlator) pickLate(m commands.Mapping, ms []commands.Mapping) (commands.Device, match, bool) {
	for _, o := range ms {
		if o.VolumeID != m.VolumeID && o.LinuxState == commands.LinuxMissing && sizeFits(m.Size, o.Size) {
			return commands.Device{}, 0, false
		}
	}
	c.mu.Lock()
	t := c.table(m.VMID)
	n, busy := 0, t.inflight > 0
	for _, d := range t.devices {
		if !devagent.HasIdentity(d) && sizeFits(d.Size, m.Size) && t.arrivedAt(d).After(m.UpdatedAt) {
			n++
		}
	}
	c.mu.Unlock()
	if busy || n != 1 {
		return commands.Device{}, 0, false
	}
	return c.pick(m, m.UpdatedAt, nil, bySizeAndTime)
}

// record stores a mapping found outside Attached, names it and publishes
// it on volumes.mappings.<volume_id>.
func (c *Correlator) record(ctx context.Context, m commands.Mapping) (commands.Mapping, error) {
	m, nameErr := c.nameOne(ctx, m)
	m, err := c.mappings.Put(ctx, nil, m)
	if err != nil {
		return m, fmt.Errorf("record mapping: %w", err)
	}
	c.mappings.Announce(m)
	return m, nameErr
}

// Reconcile repairs vmID's mappings against the volumes CloudStack has
// attached to it and the devices its agent lists now: an attached volume
// whose device is present gets a mapping if it had none, and its mapping
// follows the device if it points elsewhere or was missing; a detected
// mapping whose device is gone becomes missing; the persistent names are
// set to the detected mappings (re-making one that points elsewhere).
// Each repair is returned as a sentence.
func (c *Correlator) Reconcile(ctx context.Context, vmID string, attached []commands.Mapping) ([]string, error) {
	devs, err := c.list(ctx, vmID, requestTimeout)
	if err != nil {
		return nil, err
	}
	ms, err := c.cfg.Store.ListMappings(ctx, vmID)
	if err != nil {
		return nil, fmt.Errorf("correlate: list mappings: %w", err)
	}
	byVolume := map[string]commands.Mapping{}
	for _, m := range ms {
		byVolume[m.VolumeID] = m
	}
	byName := map[string]commands.Device{}
	for _, d := range devs {
		byName[d.Name] = d
	}
	var changes []string
	var errs []error
	isAttached := map[string]bool{}
	for _, a := range attached {
		isAttached[a.VolumeID] = true
		m, has := byVolume[a.VolumeID]
		change, err := c.repair(ctx, vmID, a, m, has, devs, byName)
		if err != nil {
			errs = append(errs, fmt.Errorf("volume %s: %w", a.VolumeID, err))
		}
		if change != "" {
			changes = append(changes, change)
		}
	}
	if len(errs) == 0 && !slices.ContainsFunc(ms, func(m commands.Mapping) bool {
		return !isAttached[m.VolumeID] && m.LinuxState == commands.LinuxDetected && c.gone(vmID, m) != ""
	}) {
		c.checked(vmID) // no mapping of vmID names a disk it does not have
	}
	reply, err := c.setNames(ctx, vmID, nil, "")
	if err != nil {
		errs = append(errs, err)
	}
	changes = append(changes, describeNames(vmID, reply)...)
	return changes, errors.Join(errs...)
}

// repair brings one attached volume's mapping (m, if has) in line with the
// devices, returning the repair in words ("" if none was needed).
func (c *Correlator) repair(ctx context.Context, vm string, a, m commands.Mapping, has bool,
	devs []commands.Device, byName map[string]commands.Device) (string, error) {
	var own *commands.Device
	for i := range devs {
		if devagent.MatchesVolume(devs[i], a.VolumeID) {
			own = &devs[i]
			break
		}
	}
	now := time.Now().UTC()
	switch {
	case !has && own != nil:
		if other, err := c.cfg.Store.GetMappingByDevice(ctx, vm, own.Path); err == nil && other.VolumeID != a.VolumeID {
			if sameDisk(other, *own) {
				return "", fmt.Errorf("%s carries its identity but is mapped to volume %s", own.Path, other.VolumeID)
			}
			if err := c.markMissing(ctx, other, "its device name now is disk "+own.Identity().String()); err != nil {
				return "", err
			}
		}
		id := own.Identity()
		m = a
		m.ID, m.CreatedAt, m.VMID, m.DeviceIdentity = "mapping-"+uuid.NewString(), now, vm, &id
		m.DevicePath, m.Size, m.LinuxState, m.CloudStackState = own.Path, own.Size, commands.LinuxDetected, commands.CloudStackAttached
		m.LastSync, m.UpdatedAt = now, now
		if _, err := c.record(ctx, m); err != nil && !errors.Is(err, ErrName) {
			return "", err
		}
		return fmt.Sprintf("mapped attached volume %s on VM %s to %s (it had no mapping)", a.VolumeID, vm, own.Path), nil
	case has && own != nil && (!sameDisk(m, *own) || m.DevicePath != own.Path || m.LinuxState != commands.LinuxDetected):
		was := fmt.Sprintf("%s, linux_state %s", m.Device(), m.LinuxState)
		id := own.Identity()
		m.DevicePath, m.Size, m.LinuxState, m.DeviceIdentity = own.Path, own.Size, commands.LinuxDetected, &id
		m.LastSync, m.UpdatedAt = now, now
		if _, err := c.record(ctx, m); err != nil && !errors.Is(err, ErrName) {
			return "", err
		}
		return fmt.Sprintf("mapping of volume %s on VM %s now points at its device %s (was %s)", a.VolumeID, vm, own.Path, was), nil
	case has && m.LinuxState == commands.LinuxDetected:
		d, present := byName[strings.TrimPrefix(m.DevicePath, "/dev/")]
		why := ""
		switch {
		case !present:
			why = "is gone"
		case !sameDisk(m, d):
			why = "is another disk now (" + d.Identity().String() + ")"
		case devagent.HasIdentity(d) && !devagent.MatchesVolume(d, a.VolumeID):
			why = "now carries another identity"
		case !devagent.HasIdentity(d) && !sizeFits(d.Size, m.Size):
			why = fmt.Sprintf("now has size %d, not %d", d.Size, m.Size)
		}
		if why == "" {
			return "", nil
		}
		if err := c.markMissing(ctx, m, "device "+why); err != nil {
			return "", err
		}
		return fmt.Sprintf("device %s of volume %s on VM %s %s: linux_state missing", m.DevicePath, a.VolumeID, vm, why), nil
	}
	return "", nil
}

// describeNames words the difference between the names an agent held
// before a names request and after it.
func describeNames(vm string, reply devagent.NamesMessage) []string {
	var out []string
	for _, name := range sortedNames(reply.Names) {
		switch prev, had := reply.Previous[name]; {
		case !had:
			out = append(out, fmt.Sprintf("made persistent name %s -> %s on VM %s", name, reply.Names[name], vm))
		case prev != reply.Names[name]:
			out = append(out, fmt.Sprintf("persistent name %s on VM %s pointed to %s, now %s", name, vm, prev, reply.Names[name]))
		}
	}
	for _, name := range sortedNames(reply.Previous) {
		if _, kept := reply.Names[name]; !kept {
			out = append(out, fmt.Sprintf("removed persistent name %s -> %s on VM %s", name, reply.Previous[name], vm))
		}
	}
	return out
}
