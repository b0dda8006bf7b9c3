package devagent

import (
	"errors"
	"fmt"
	"path"
	"strconv"
	"sync/atomic"

	"github.com/mdlayher/kobject"
)

// EventSource delivers kernel uevents. Receive blocks until the next uevent
// of any subsystem (so the caller sees every SEQNUM and can detect a gap)
// or an error; after Close it returns an error wrapping ErrSourceClosed.
// An error from an open source (e.g. ENOBUFS after an overflow) means
// uevents may have been lost; Receive can be called again.
type EventSource interface {
	Receive() (Uevent, error)
	Close() error
}

// ErrSourceClosed is returned by Receive once the source is closed.
var ErrSourceClosed = errors.New("devagent: event source closed")

// Uevent is one kernel uevent, reduced to the fields the agent uses.
type Uevent struct {
	Action    string // "add", "remove", "change", ...
	DevPath   string // e.g. /devices/virtual/block/loop3
	Subsystem string // e.g. "block"
	DevName   string // e.g. "loop3"; "" if the uevent carries none
	DevType   string // "disk" or "partition" for block
	Major     int    // MAJOR, 0 if the uevent carries none
	Minor     int    // MINOR, 0 if the uevent carries none
	Seqnum    uint64 // SEQNUM, the kernel's uevent sequence number
}

// IsDisk reports whether the uevent is about a whole block disk (not a
// partition).
func (u Uevent) IsDisk() bool { return u.Subsystem == "block" && u.DevType == "disk" }

// Name is the kernel name of the device: DEVNAME, else the last element of
// DEVPATH.
func (u Uevent) Name() string {
	if u.DevName != "" {
		return path.Base(u.DevName)
	}
	return path.Base(u.DevPath)
}

// kobjectSource is the EventSource on a NETLINK_KOBJECT_UEVENT socket.
type kobjectSource struct {
	c      *kobject.Client
	closed atomic.Bool
}

var _ EventSource = (*kobjectSource)(nil)

// NewKobjectSource opens a NETLINK_KOBJECT_UEVENT socket (group 1, kernel
// uevents before udev) through github.com/mdlayher/kobject. That library
// drops a KEY=VALUE whose value contains '=' and has no receive-buffer
// setting; neither matters for block disks, and an overflow is repaired by
// the agent's rescan.
func NewKobjectSource() (EventSource, error) {
	c, err := kobject.New()
	if err != nil {
		return nil, fmt.Errorf("devagent: open uevent socket: %w", err)
	}
	return &kobjectSource{c: c}, nil
}

// Receive returns the next uevent.
func (s *kobjectSource) Receive() (Uevent, error) {
	e, err := s.c.Receive()
	if err != nil {
		if s.closed.Load() {
			return Uevent{}, fmt.Errorf("%w: %w", ErrSourceClosed, err)
		}
		return Uevent{}, fmt.Errorf("devagent: receive uevent: %w", err)
	}
	u := Uevent{
		Action:    string(e.Action),
		DevPath:   e.DevicePath,
		Subsystem: e.Subsystem,
		DevName:   e.Values["DEVNAME"],
		DevType:   e.Values["DEVTYPE"],
		Seqnum:    uint64(e.Sequence),
	}
	u.Major, _ = strconv.Atoi(e.Values["MAJOR"])
	u.Minor, _ = strconv.Atoi(e.Values["MINOR"])
	return u, nil
}

// Close closes the socket, ending a blocked Receive.
func (s *kobjectSource) Close() error {
	s.closed.Store(true)
	return s.c.Close()
}
