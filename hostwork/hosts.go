package hostwork

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/volumed/volumed/commands"
)

// HostSubjectPrefix prefixes the per-VM subjects of host work:
// volumed.hosts.<vm_id>.exports is answered by the volumed serving that VM
// (its NBD server), never by another member of the group.
const HostSubjectPrefix = "volumed.hosts."

// hostSubject is the subject of the export work of one VM.
func hostSubject(vmID string) string { return HostSubjectPrefix + vmID + ".exports" }

// hostTimeout bounds one request to the instance serving a VM.
const hostTimeout = exportSyncTimeout + 5*time.Second

// Actions of a host request.
const (
	// hostPing: is an NBD server serving this VM?
	hostPing = "ping"
	// hostSync: serve exactly this VM's export records now.
	hostSync = "sync"
	// hostAutoExport: a volume was just attached and mapped; export it if
	// this host's --nbd-auto-export says so.
	hostAutoExport = "auto-export"
	// hostClients: how many clients has export Export connected?
	hostClients = "clients"
)

// hostRequest is the body of a request on hostSubject.
type hostRequest struct {
	Action  string            `json:"action"`
	Mapping *commands.Mapping `json:"mapping,omitempty"`
	// Change is the export write the requester just made, applied over
	// the host's reading of the records, which may not show it yet.
	Change *exportChange `json:"change,omitempty"`
	// Export is the export name of a clients request.
	Export string `json:"export,omitempty"`
}

// exportChange is one export record written (Put) or removed (Removed,
// a volume id).
type exportChange struct {
	Put     *commands.Export `json:"put,omitempty"`
	Removed string           `json:"removed,omitempty"`
}

// apply returns vmID's records with the change made over them.
func (c *exportChange) apply(recs []commands.Export, vmID string) []commands.Export {
	if c == nil {
		return recs
	}
	gone := c.Removed
	if c.Put != nil {
		gone = c.Put.VolumeID
	}
	recs = slices.DeleteFunc(recs, func(e commands.Export) bool { return e.VolumeID == gone })
	if c.Put != nil && c.Put.VMID == vmID {
		recs = append(recs, *c.Put)
	}
	return recs
}

// hostReply is its answer: the records the NBD server could not serve
// (deleted), the connected clients of a clients request, and the error,
// if any.
type hostReply struct {
	Dropped []string `json:"dropped,omitempty"`
	Clients int      `json:"clients,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// errNoHost: no volumed with an NBD server serves the VM.
var errNoHost = errors.New("no volumed with an NBD server serves the VM")

// askHost runs a host action for vmID: here when this instance serves that
// VM, else on the instance that does, through its per-VM subject.
func (h *Host) askHost(ctx context.Context, vmID string, req hostRequest) ([]string, error) {
	rep, err := h.ask(ctx, vmID, req)
	return rep.Dropped, err
}

// ask runs a host action for vmID and returns the whole reply.
func (h *Host) ask(ctx context.Context, vmID string, req hostRequest) (hostReply, error) {
	if vmID == h.cfg.VMID && h.cfg.Exporter != nil {
		return h.hostAction(ctx, req)
	}
	data, _ := json.Marshal(req)
	ctx, cancel := context.WithTimeout(ctx, hostTimeout)
	defer cancel()
	msg, err := h.cfg.Conn.RequestWithContext(ctx, hostSubject(vmID), data)
	if errors.Is(err, nats.ErrNoResponders) {
		return hostReply{}, fmt.Errorf("VM %s: %w", vmID, errNoHost)
	}
	if err != nil {
		return hostReply{}, fmt.Errorf("volumed serving VM %s: %w", vmID, err)
	}
	var rep hostReply
	if err := json.Unmarshal(msg.Data, &rep); err != nil {
		return hostReply{}, fmt.Errorf("volumed serving VM %s: reply %q: %w", vmID, msg.Data, err)
	}
	if rep.Error != "" {
		return rep, fmt.Errorf("volumed serving VM %s: %s", vmID, rep.Error)
	}
	return rep, nil
}

// hostAction runs a host action on this instance's NBD server.
func (h *Host) hostAction(ctx context.Context, req hostRequest) (hostReply, error) {
	switch req.Action {
	case hostPing:
		return hostReply{}, nil
	case hostSync:
		dropped, err := h.syncExports(ctx, req.Change)
		return hostReply{Dropped: dropped}, err
	case hostAutoExport:
		if req.Mapping != nil {
			h.autoExportHere(ctx, nil, *req.Mapping)
		}
		return hostReply{}, nil
	case hostClients:
		return hostReply{Clients: h.cfg.Exporter.Clients()[req.Export]}, nil
	}
	return hostReply{}, fmt.Errorf("unknown host action %q", req.Action)
}

// onHostRequest answers a request on this VM's host subject.
func (h *Host) onHostRequest(msg *nats.Msg) {
	var req hostRequest
	var rep hostReply
	if err := json.Unmarshal(msg.Data, &req); err != nil {
		rep.Error = "bad host request: " + err.Error()
	} else {
		ctx, cancel := context.WithTimeout(h.ctx, exportSyncTimeout)
		var err error
		rep, err = h.hostAction(ctx, req)
		cancel()
		if err != nil {
			rep.Error = err.Error()
		}
	}
	data, _ := json.Marshal(rep)
	if err := msg.Respond(data); err != nil {
		h.log.Warn("host reply failed", "err", err)
	}
}
