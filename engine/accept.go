package engine

import (
	"context"

	"github.com/volumed/volumed/commands"
)

// Endpoint is a command subject a kind takes, with the name of its
// endpoint in the micro service.
type Endpoint struct {
	Name, Subject string
}

// Command is a command as its kind accepts it: what its operation
// records, and its pre-checks.
type Command struct {
	// VolumeID and VMID are recorded on the operation (VMID may be
	// filled in by Check).
	VolumeID string
	VMID     *string
	// VolumeIDs are every volume of a command on several (a failover):
	// the operation holds each one's line; nil for one volume.
	VolumeIDs []string
	// Request is recorded as the operation's request.
	Request any
	// Check runs the pre-checks; nil for none. checkCtx bounds what asks
	// CloudStack or its cached lists (past it the command is accepted
	// unchecked); ctx is the command's own, for the store and the hosts.
	Check func(ctx, checkCtx context.Context) error
}

// Accepter is a kind that takes commands.
type Accepter interface {
	// Endpoints are the subjects the kind's commands come on.
	Endpoints() []Endpoint
	// Decode reads a command that came on subject: a bad body is a 400
	// naming its field; otherwise what the operation records, with its
	// pre-checks.
	Decode(ctx context.Context, subject string, data []byte) (Command, error)
}

// Kinds returns the registered kinds, in the order they were registered.
func (e *Engine) Kinds() []Kind { return e.order }

// ExportsOff is the answer to every export command and read when volumed
// runs without an NBD server.
func ExportsOff() *commands.Error {
	return commands.Unavailable("the NBD server is off (--nbd-listen is empty)")
}
