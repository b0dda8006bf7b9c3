package correlate

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path"
	"path/filepath"
	"slices"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/metrics/hooks"
	"github.com/volumed/volumed/state"
)

// match is how a device was found for a volume.
type match int

const (
	byIdentity match = iota + 1
	bySizeAndTime
)

func (m match) String() string {
	if m == byIdentity {
		return "identity"
	}
	return "size and time"
}

// Attached waits for the device of a volume just attached to want.VMID.
// A device whose identity (virtio serial, SCSI WWID, loop backing file)
// derives from the volume UUID wins; a device without identity qualifies
// when it appeared after since with the volume's size. A device held by
// another mapping or another correlation is never taken. The device is
// re-checked with a fresh list right before it is returned, and its
// persistent name made. After Config.Timeout it returns the mapping with
// linux_state missing and an error wrapping ErrTimeout.
func (c *Correlator) Attached(ctx context.Context, want commands.Mapping, since time.Time) (commands.Mapping, error) {
	defer hooks.Correlation(time.Now())
	vm := want.VMID
	timer := time.NewTimer(c.cfg.Timeout)
	defer timer.Stop()
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	c.mu.Lock()
	c.table(vm).inflight++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.table(vm).inflight--
		c.mu.Unlock()
	}()
	skip := map[commands.DeviceIdentity]bool{} // devices ruled out since the last change
	refresh := true
	for {
		if refresh {
			if _, err := c.list(ctx, vm, requestTimeout); err != nil {
				c.log.Warn("list devices while waiting", "vm_id", vm, "volume_id", want.VolumeID, "err", err)
			} else {
				clear(skip) // judged again on a fresh list (a rejection may have been the agent's silence)
			}
			refresh = false
		}
		c.mu.Lock()
		changed := c.table(vm).changed
		c.mu.Unlock()
		m, ok, err := c.try(ctx, want, since, skip)
		if ok {
			return m, err
		}
		select {
		case <-ctx.Done():
			return missing(want), ctx.Err()
		case <-timer.C:
			return missing(want), fmt.Errorf("%w: volume %s on VM %s: none within %v (linux_state missing; a later device heals the mapping)",
				ErrTimeout, want.VolumeID, vm, c.cfg.Timeout)
		case <-changed:
			clear(skip)
		case <-poll.C:
			refresh = true
		}
	}
}

// missing is want as recorded when its device did not come.
func missing(want commands.Mapping) commands.Mapping {
	now := time.Now().UTC()
	want.CloudStackState, want.LinuxState = commands.CloudStackAttached, commands.LinuxMissing
	want.DevicePath, want.PersistentDeviceName, want.SymlinkPath, want.DeviceIdentity = "", "", "", nil
	want.LastSync, want.UpdatedAt = now, now
	return want
}

// try looks once for the volume's device among the known ones. ok is
// false when none qualifies yet; a device that failed a check goes into
// skip.
func (c *Correlator) try(ctx context.Context, want commands.Mapping, since time.Time, skip map[commands.DeviceIdentity]bool) (commands.Mapping, bool, error) {
	vm := want.VMID
	dev, how, found := c.pick(want, since, skip, byIdentity)
	if !found {
		c.mu.Lock()
		t := c.table(vm)
		c.mu.Unlock()
		// One size-and-time pick at a time per VM, so each sees the claims
		// of the one before.
		t.fallback.Lock()
		defer t.fallback.Unlock()
		if dev, how, found = c.pick(want, since, skip, bySizeAndTime); !found {
			return commands.Mapping{}, false, nil
		}
	}
	m, err := c.take(ctx, want, dev, how)
	if err != nil {
		c.unclaim(vm, dev.Identity(), want.VolumeID)
		skip[dev.Identity()] = true
		if ctx.Err() != nil {
			return missing(want), true, ctx.Err()
		}
		c.log.Info("device candidate rejected", "vm_id", vm, "volume_id", want.VolumeID, "device", dev.Path, "match", how.String(), "reason", err)
		return commands.Mapping{}, false, nil
	}
	// Held until the caller has recorded it (or it goes away), and named
	// with the VM's other names from now on.
	c.hold(vm, dev.Identity(), want.VolumeID)
	c.mu.Lock()
	c.table(vm).identity = map[match]int{byIdentity: 1, bySizeAndTime: -1}[how]
	c.mu.Unlock()
	var nameErr error
	if m, nameErr = c.nameOne(ctx, m); nameErr != nil {
		c.log.Warn("persistent name", "volume_id", want.VolumeID, "device", m.DevicePath, "err", nameErr)
	}
	c.log.Info("device correlated", "vm_id", vm, "volume_id", want.VolumeID, "device", m.DevicePath,
		"match", how.String(), "persistent_name", m.PersistentDeviceName)
	return m, true, nameErr
}

// pick chooses and claims a candidate device for want: with byIdentity the
// device whose identity is the volume's, with bySizeAndTime the earliest
// device without identity that appeared after since with the volume's
// size. Claimed and skipped devices are passed over.
func (c *Correlator) pick(want commands.Mapping, since time.Time, skip map[commands.DeviceIdentity]bool, how match) (commands.Device, match, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.table(want.VMID)
	type cand struct {
		dev commands.Device
		at  time.Time
	}
	var cands []cand
	for _, d := range t.devices {
		if skip[d.Identity()] || c.claimedByOther(want.VMID, d.Identity(), want.VolumeID) {
			continue
		}
		at := t.arrivedAt(d)
		switch how {
		case byIdentity:
			if devagent.MatchesVolume(d, want.VolumeID) {
				cands = append(cands, cand{d, at})
			}
		case bySizeAndTime:
			if !devagent.HasIdentity(d) && sizeFits(d.Size, want.Size) && !at.IsZero() && at.After(since) {
				cands = append(cands, cand{d, at})
			}
		}
	}
	if len(cands) == 0 {
		return commands.Device{}, how, false
	}
	s := slices.MinFunc(cands, func(a, b cand) int {
		return cmp.Or(a.at.Compare(b.at), cmp.Compare(a.dev.Name, b.dev.Name))
	})
	k := claimKey{want.VMID, s.dev.Identity()}
	if cl := c.claims[k]; cl.volumeID != want.VolumeID {
		c.claims[k] = claim{volumeID: want.VolumeID}
	}
	return s.dev, how, true
}

// sizeFits reports whether a device of size got could be a volume of size
// want: as large, and at most sizeSlack larger.
func sizeFits(got, want int64) bool {
	return want > 0 && got >= want && got-want <= sizeSlack
}

// claimedByOther reports whether another volume holds the disk; c.mu
// must be held.
func (c *Correlator) claimedByOther(vm string, id commands.DeviceIdentity, volumeID string) bool {
	cl, ok := c.claims[claimKey{vm, id}]
	return ok && cl.volumeID != volumeID
}

// hold marks volumeID's claim of a disk as handed out: named with the
// VM's other names until its mapping is recorded.
func (c *Correlator) hold(vm string, id commands.DeviceIdentity, volumeID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.claims[claimKey{vm, id}] = claim{volumeID: volumeID, held: true}
}

// unclaim drops volumeID's claim of a disk.
func (c *Correlator) unclaim(vm string, id commands.DeviceIdentity, volumeID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := claimKey{vm, id}
	if c.claims[k].volumeID == volumeID {
		delete(c.claims, k)
	}
}

// sameDisk reports whether a mapping's recorded device is the disk d; a
// mapping recorded without identity is compared by path.
func sameDisk(m commands.Mapping, d commands.Device) bool {
	if m.DeviceIdentity == nil {
		return m.DevicePath == d.Path
	}
	return *m.DeviceIdentity == d.Identity()
}

// take checks a claimed candidate against the store and re-checks it with
// a fresh list, returning the mapping to record.
func (c *Correlator) take(ctx context.Context, want commands.Mapping, dev commands.Device, how match) (commands.Mapping, error) {
	other, err := c.cfg.Store.GetMappingByDevice(ctx, want.VMID, dev.Path)
	switch {
	case errors.Is(err, state.ErrNotFound):
	case err != nil:
		return commands.Mapping{}, fmt.Errorf("look up mapping of %s: %w", dev.Path, err)
	case other.VolumeID == want.VolumeID:
	case other.VMID == want.VMID && (!sameDisk(other, dev) ||
		(other.DeviceIdentity == nil && how == byIdentity && !devagent.MatchesVolume(dev, other.VolumeID))):
		// Another disk under the same name: the other mapping's device is
		// gone and the kernel reused the name.
		if err := c.markMissing(ctx, other, "its device name now is disk "+dev.Identity().String()); err != nil {
			return commands.Mapping{}, err
		}
	default:
		return commands.Mapping{}, fmt.Errorf("%s is mapped to volume %s", dev.Path, other.VolumeID)
	}
	fresh, err := c.verify(ctx, want.VMID, dev, func(d commands.Device) bool {
		if how == byIdentity {
			return devagent.MatchesVolume(d, want.VolumeID)
		}
		return !devagent.HasIdentity(d) && d.Size == dev.Size
	})
	if err != nil {
		return commands.Mapping{}, err
	}
	now := time.Now().UTC()
	m := want
	id := fresh.Identity()
	m.DevicePath, m.Size, m.DeviceIdentity = fresh.Path, fresh.Size, &id
	m.CloudStackState, m.LinuxState = commands.CloudStackAttached, commands.LinuxDetected
	m.LastSync, m.UpdatedAt = now, now
	return m, nil
}

// verify lists the VM's devices afresh and checks dev is still there as
// the same disk (name, major:minor, diskseq or generation), and that
// same(it) holds; on this host's own VM, that the kernel agrees.
func (c *Correlator) verify(ctx context.Context, vm string, dev commands.Device, same func(commands.Device) bool) (commands.Device, error) {
	devs, err := c.list(ctx, vm, requestTimeout)
	if err != nil {
		return commands.Device{}, err
	}
	i := slices.IndexFunc(devs, func(d commands.Device) bool { return d.Name == dev.Name })
	switch {
	case i < 0:
		return commands.Device{}, fmt.Errorf("%s is gone", dev.Path)
	case devs[i].Identity() != dev.Identity():
		return commands.Device{}, fmt.Errorf("%s is now disk %s, was %s", dev.Path, devs[i].Identity(), dev.Identity())
	case !same(devs[i]):
		return commands.Device{}, fmt.Errorf("%s changed identity or size", dev.Path)
	}
	if vm == c.cfg.LocalVMID && vm != "" {
		if err := devagent.CheckLocal("", "", dev.Identity()); err != nil {
			return commands.Device{}, fmt.Errorf("the agent's %s is not that disk on this host: %w", dev.Path, err)
		}
	}
	return devs[i], nil
}

// markMissing records that a mapping's device is gone, as a CAS on the
// record as it is now; a record that changed meanwhile is read and
// judged again.
func (c *Correlator) markMissing(ctx context.Context, m commands.Mapping, why string) error {
	for attempt := 1; ; attempt++ {
		// Mark the record as it is now: a detach may have ended it, or
		// another writer moved it, since m was read.
		cur, err := c.cfg.Store.GetMapping(ctx, m.VolumeID)
		if errors.Is(err, state.ErrNotFound) || (err == nil && (cur.DevicePath != m.DevicePath || cur.VMID != m.VMID ||
			!sameIdentity(cur.DeviceIdentity, m.DeviceIdentity))) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("mark mapping of volume %s missing: %w", m.VolumeID, err)
		}
		gone, err := c.mappings.Put(ctx, nil, missing(cur))
		if errors.Is(err, state.ErrStale) && attempt < maxStale {
			continue
		}
		if err != nil {
			return fmt.Errorf("mark mapping of volume %s missing: %w", m.VolumeID, err)
		}
		c.mappings.Announce(gone)
		c.log.Warn("mapping device gone", "volume_id", m.VolumeID, "vm_id", m.VMID, "device", m.DevicePath, "reason", why)
		return nil
	}
}

// announce publishes a mapping the correlator changed outside an attach
// on volumes.mappings.<volume_id>: the mapping writer's announcer.
func (c *Correlator) announce(m commands.Mapping) {
	data, err := json.Marshal(m)
	if err == nil {
		err = c.cfg.Conn.Publish(commands.MappingSubject(m.VolumeID), data)
	}
	if err != nil {
		c.log.Warn("publish mapping", "volume_id", m.VolumeID, "err", err)
	}
}

// nameOne makes the persistent name of m (with the VM's other names) and
// returns m with it; on failure m without it and an error wrapping ErrName.
func (c *Correlator) nameOne(ctx context.Context, m commands.Mapping) (commands.Mapping, error) {
	name := devagent.PersistentName(m.VolumeID)
	reply, err := c.setNames(ctx, m.VMID, &m, "")
	if err != nil {
		return m, err
	}
	if reply.Names[name] != m.DevicePath {
		return m, fmt.Errorf("%w: %s for %s: %s", ErrName, name, m.DevicePath, cmp.Or(reply.Skipped[name], reply.Error, "not made"))
	}
	m.PersistentDeviceName, m.SymlinkPath = name, filepath.Join(reply.Dir, name)
	return m, nil
}

// sameIdentity reports whether two recorded disk identities are equal,
// both absent included.
func sameIdentity(a, b *commands.DeviceIdentity) bool {
	return a == b || (a != nil && b != nil && *a == *b)
}

// setNames sends the VM's agent the full set of persistent names, each
// with the identity its disk must have: every detected mapping of the VM
// in the store, overridden by the disks handed out but not recorded yet
// (held claims) and by extra, without volume `without`. A claim whose
// mapping is recorded with its disk ends here: the store holds it now.
func (c *Correlator) setNames(ctx context.Context, vm string, extra *commands.Mapping, without string) (devagent.NamesMessage, error) {
	c.mu.Lock()
	t := c.table(vm)
	c.mu.Unlock()
	t.names.Lock()
	defer t.names.Unlock()
	ms, err := c.cfg.Store.ListMappings(ctx, vm)
	if err != nil {
		return devagent.NamesMessage{}, fmt.Errorf("%w: list mappings of VM %s: %w", ErrName, vm, err)
	}
	latest := map[string]commands.Mapping{}
	for _, m := range ms {
		latest[m.VolumeID] = m
	}
	c.mu.Lock()
	for k, cl := range c.claims {
		if k.vm != vm || !cl.held {
			continue
		}
		if m, ok := latest[cl.volumeID]; ok && m.DeviceIdentity != nil && *m.DeviceIdentity == k.id {
			delete(c.claims, k)
			continue
		}
		id := k.id
		latest[cl.volumeID] = commands.Mapping{VolumeID: cl.volumeID, DevicePath: id.Path(), DeviceIdentity: &id,
			LinuxState: commands.LinuxDetected}
	}
	c.mu.Unlock()
	if extra != nil {
		latest[extra.VolumeID] = *extra
	}
	delete(latest, without)
	req := devagent.NamesMessage{Names: map[string]string{}, Identities: map[string]commands.DeviceIdentity{}}
	owner := map[string]string{}
	for _, id := range slices.Sorted(maps.Keys(latest)) {
		m := latest[id]
		if m.LinuxState != commands.LinuxDetected || m.DevicePath == "" {
			continue
		}
		name := devagent.PersistentName(m.VolumeID)
		if prev, dup := owner[name]; dup {
			c.log.Error("persistent name collision", "name", name, "volume_id", m.VolumeID, "other_volume_id", prev)
			continue
		}
		owner[name], req.Names[name] = m.VolumeID, m.DevicePath
		if m.DeviceIdentity != nil {
			req.Identities[name] = *m.DeviceIdentity
		}
	}
	body, err := json.Marshal(req)
	if err != nil {
		return devagent.NamesMessage{}, fmt.Errorf("%w: %w", ErrName, err)
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	msg, err := c.cfg.Conn.RequestWithContext(rctx, commands.DevicesNamesSubject(vm), body)
	if err != nil {
		return devagent.NamesMessage{}, fmt.Errorf("%w: %w: names of VM %s: %w", ErrName, ErrAgent, vm, err)
	}
	var reply devagent.NamesMessage
	if err := json.Unmarshal(msg.Data, &reply); err != nil {
		return devagent.NamesMessage{}, fmt.Errorf("%w: %w: names reply of VM %s: %w", ErrName, ErrAgent, vm, err)
	}
	if reply.Names == nil && reply.Error != "" {
		return reply, fmt.Errorf("%w: %w: VM %s: %s", ErrName, ErrAgent, vm, reply.Error)
	}
	return reply, nil
}

// Detached waits, up to Config.ReleaseTimeout, until the device of m is
// gone from its VM (a remove event, or absent from a fresh list), then
// re-sends the VM's names without the volume's. Meanwhile heal leaves the
// mapping to the caller, who removes it next. A device still there at
// the end is an error wrapping engine.ErrDevicePresent; the name is
// removed all the same.
func (c *Correlator) Detached(ctx context.Context, m commands.Mapping) error {
	c.mu.Lock()
	c.releasing[m.VolumeID]++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if c.releasing[m.VolumeID]--; c.releasing[m.VolumeID] <= 0 {
			delete(c.releasing, m.VolumeID)
		}
		c.mu.Unlock()
	}()
	var waitErr error
	if m.LinuxState == commands.LinuxDetected && m.DevicePath != "" {
		waitErr = c.waitGone(ctx, m)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	c.mu.Lock()
	for k, cl := range c.claims {
		if k.vm == m.VMID && cl.volumeID == m.VolumeID {
			delete(c.claims, k)
		}
	}
	c.mu.Unlock()
	_, err := c.setNames(ctx, m.VMID, nil, m.VolumeID)
	return errors.Join(waitErr, err)
}

// waitGone waits until m's device is absent from the VM, is another disk
// under its name, or shows another volume's identity.
func (c *Correlator) waitGone(ctx context.Context, m commands.Mapping) error {
	timer := time.NewTimer(c.cfg.ReleaseTimeout)
	defer timer.Stop()
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	name := path.Base(m.DevicePath)
	refresh := true
	for {
		if refresh {
			if _, err := c.list(ctx, m.VMID, requestTimeout); err != nil {
				c.log.Warn("list devices while releasing", "vm_id", m.VMID, "volume_id", m.VolumeID, "err", err)
			}
			refresh = false
		}
		c.mu.Lock()
		t := c.table(m.VMID)
		d, present := t.devices[name]
		changed := t.changed
		c.mu.Unlock()
		if !present || !sameDisk(m, d) || (devagent.HasIdentity(d) && !devagent.MatchesVolume(d, m.VolumeID)) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
			return fmt.Errorf("device %s of volume %s on VM %s after %v: %w", m.DevicePath, m.VolumeID, m.VMID, c.cfg.ReleaseTimeout, engine.ErrDevicePresent)
		case <-changed:
		case <-poll.C:
			refresh = true
		}
	}
}

// sortedNames lists a name set's keys in order.
func sortedNames(set map[string]string) []string { return slices.Sorted(maps.Keys(set)) }
