package correlate

import (
	"context"
	"encoding/json"
	"fmt"
	"path"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
)

// Users asks the agent of m's VM who uses m's device there: mounts of it
// or its partitions, dm or md holders, and processes other than the
// agent's own with it open. A mapping without a detected device has none;
// an agent that does not answer (the one that found the device) is an
// error wrapping ErrAgent.
func (c *Correlator) Users(ctx context.Context, m commands.Mapping) ([]commands.DeviceUser, error) {
	if m.LinuxState != commands.LinuxDetected || m.DevicePath == "" {
		return nil, nil
	}
	if !c.HasAgent(ctx, m.VMID) {
		return nil, fmt.Errorf("%w: the device agent of VM %s does not answer", ErrAgent, m.VMID)
	}
	req := devagent.UsersRequest{Identity: commands.DeviceIdentity{Name: path.Base(m.DevicePath)}}
	if m.DeviceIdentity != nil {
		req.Identity = *m.DeviceIdentity
	}
	if m.SymlinkPath != "" {
		req.Aliases = []string{m.SymlinkPath}
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	msg, err := c.cfg.Conn.RequestWithContext(rctx, commands.DevicesUsersSubject(m.VMID), body)
	if err != nil {
		return nil, fmt.Errorf("%w: users of %s on VM %s: %w", ErrAgent, m.DevicePath, m.VMID, err)
	}
	var reply devagent.UsersReply
	if err := json.Unmarshal(msg.Data, &reply); err != nil {
		return nil, fmt.Errorf("%w: users reply of VM %s: %w", ErrAgent, m.VMID, err)
	}
	if reply.Error != "" {
		return nil, fmt.Errorf("%w: users of %s on VM %s: %s", ErrAgent, m.DevicePath, m.VMID, reply.Error)
	}
	return reply.Users, nil
}
