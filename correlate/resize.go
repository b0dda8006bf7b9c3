package correlate

import (
	"context"
	"fmt"
	"time"

	"github.com/volumed/volumed/commands"
)

// Resized waits until the device of m on m's VM shows at least size
// bytes: a change event of the device, or a list (at once, then every
// pollInterval), brings its new size. It returns the size the device
// shows; after Config.Timeout it fails with an error wrapping ErrTimeout
// and the size last seen (0 when the device is not there).
func (c *Correlator) Resized(ctx context.Context, m commands.Mapping, size int64) (int64, error) {
	vm := m.VMID
	timer := time.NewTimer(c.cfg.Timeout)
	defer timer.Stop()
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	refresh := true
	for {
		if refresh {
			if _, err := c.list(ctx, vm, requestTimeout); err != nil {
				c.log.Warn("list devices while waiting for a resize", "vm_id", vm, "volume_id", m.VolumeID, "err", err)
			}
			refresh = false
		}
		c.mu.Lock()
		t := c.table(vm)
		changed := t.changed
		var seen int64
		for _, d := range t.devices {
			if sameDisk(m, d) {
				seen = d.Size
			}
		}
		c.mu.Unlock()
		if seen >= size {
			c.log.Info("device shows the new size", "vm_id", vm, "volume_id", m.VolumeID, "device", m.DevicePath, "size", seen)
			return seen, nil
		}
		select {
		case <-ctx.Done():
			return seen, ctx.Err()
		case <-timer.C:
			return seen, fmt.Errorf("%w: device %s of volume %s on VM %s shows %d bytes, not %d, after %v",
				ErrTimeout, m.DevicePath, m.VolumeID, vm, seen, size, c.cfg.Timeout)
		case <-changed:
		case <-poll.C:
			refresh = true
		}
	}
}
