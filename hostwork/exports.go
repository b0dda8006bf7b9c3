package hostwork

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/nbd"
	"github.com/volumed/volumed/state"
)

// exportSyncTimeout bounds one sync of the served exports, the closing of
// removed exports' clients included.
const exportSyncTimeout = 30 * time.Second

// Exporter serves export records, as NBD exports on this host.
type Exporter interface {
	// Sync makes the served set exactly exports: new ones are served when
	// it returns, removed ones refuse new clients at once and have their
	// clients closed before it returns. An export that cannot be opened is
	// left out (and missing from Clients) while the rest is applied.
	Sync(ctx context.Context, exports []commands.Export) error
	// Clients counts the connected clients of each served export, by
	// export name.
	Clients() map[string]int
}

// NBDExporter is the Exporter on volumed's NBD server. It serves only the
// recorded disk of an export: the kernel node /dev/<name> of its device
// identity, checked on this host (CheckLocal, CheckVolume) and opened by the NBD
// server with O_NOFOLLOW as that device number and, where the kernel has
// diskseq, that diskseq, both read on the open descriptor; never a path an
// agent chose, nor the persistent name.
type NBDExporter struct {
	// Server is the NBD server whose exports are set.
	Server *nbd.Server
	// SysRoot and DevRoot are where sysfs and /dev are; empty: the host's.
	SysRoot, DevRoot string
	// beforeOpen, when set (tests), runs after the records are checked and
	// before the server opens their disks.
	beforeOpen func()
}

var _ Exporter = NBDExporter{}

// Sync sets the server's exports to the records whose disk is present as
// recorded. A record without identity, or whose disk changed, is left out
// and named in the error; so is one whose disk changed before it was
// opened: the server checks the open descriptor's device number and
// diskseq before it serves it. Without diskseq (kernels before 5.15) the
// disk is checked again once open, when the open holds it (an open loop
// device cannot be bound to another file).
func (x NBDExporter) Sync(ctx context.Context, exports []commands.Export) error {
	var errs []error
	specs := make([]nbd.ExportSpec, 0, len(exports))
	for _, e := range exports {
		sp, err := x.spec(e)
		if err != nil {
			errs = append(errs, fmt.Errorf("export %s of volume %s: %w", e.ExportName, e.VolumeID, err))
			continue
		}
		specs = append(specs, sp)
	}
	if x.beforeOpen != nil {
		x.beforeOpen()
	}
	errs = append(errs, x.Server.SetExports(ctx, specs))
	kept := slices.DeleteFunc(slices.Clone(specs), func(sp nbd.ExportSpec) bool {
		if sp.DiskSeq != 0 {
			return false // the server found the recorded diskseq on the open descriptor
		}
		e := exports[slices.IndexFunc(exports, func(e commands.Export) bool { return e.ExportName == sp.Name })]
		err := x.check(e)
		if err != nil {
			errs = append(errs, fmt.Errorf("export %s of volume %s: disk changed while opened: %w", e.ExportName, e.VolumeID, err))
		}
		return err != nil
	})
	if len(kept) != len(specs) {
		errs = append(errs, x.Server.SetExports(ctx, kept))
	}
	return errors.Join(errs...)
}

// spec is the NBD export of e's recorded disk, checked on this host.
func (x NBDExporter) spec(e commands.Export) (nbd.ExportSpec, error) {
	if e.DeviceIdentity == nil {
		return nbd.ExportSpec{}, errors.New("no recorded disk identity")
	}
	if err := x.check(e); err != nil {
		return nbd.ExportSpec{}, err
	}
	id := *e.DeviceIdentity
	return nbd.ExportSpec{Name: e.ExportName, Path: id.Path(), Device: unix.Mkdev(uint32(id.Major), uint32(id.Minor)),
		DiskSeq: id.DiskSeq, ReadOnly: e.ReadOnly, Description: "volume " + e.VolumeID}, nil
}

// check checks on this host that e's recorded disk is present as recorded
// and does not carry another volume's identity.
func (x NBDExporter) check(e commands.Export) error {
	id := *e.DeviceIdentity
	if err := devagent.CheckLocal(x.SysRoot, x.DevRoot, id); err != nil {
		return err
	}
	return devagent.CheckVolume(x.SysRoot, id.Name, e.VolumeID)
}

// Clients reads the served exports' client counts.
func (x NBDExporter) Clients() map[string]int {
	out := map[string]int{}
	for _, st := range x.Server.Exports() {
		out[st.Name] = st.Clients
	}
	return out
}

// exportable returns the export a mapping allows: only a volume whose
// device was found on the VM it is attached to; the volumed serving that
// VM serves the export. why says what is missing otherwise.
func (h *Host) exportable(m commands.Mapping) (e commands.Export, why string) {
	if m.LinuxState != commands.LinuxDetected {
		return e, fmt.Sprintf("its device on VM %s is %s", m.VMID, m.LinuxState)
	}
	e = commands.Export{VolumeID: m.VolumeID, VMID: m.VMID, ExportName: m.PersistentDeviceName,
		DevicePath: m.SymlinkPath, DeviceIdentity: m.DeviceIdentity, Status: commands.ExportActive}
	if e.ExportName == "" {
		e.ExportName = devagent.PersistentName(m.VolumeID)
	}
	if e.DevicePath == "" {
		e.DevicePath = m.DevicePath
	}
	if e.DevicePath == "" {
		return e, "its device has no path"
	}
	if e.DeviceIdentity == nil {
		return e, "its device has no recorded identity"
	}
	return e, ""
}

// ExportFor returns the export the volume's mapping allows, or a
// CONFLICT saying why there is none.
func (h *Host) ExportFor(ctx context.Context, volumeID string) (commands.Export, error) {
	m, err := h.cfg.Store.GetMapping(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return commands.Export{}, commands.Conflict("volume %s is not attached to a VM with a device agent", volumeID).
			WithDetail("volume_id", volumeID)
	}
	if err != nil {
		return commands.Export{}, state.APIError(err)
	}
	e, why := h.exportable(m)
	if why != "" {
		return e, commands.Conflict("volume %s cannot be exported: %s", volumeID, why).WithDetail("volume_id", volumeID)
	}
	return e, nil
}

// PutExport records e (keeping the creation time of a record it
// replaces), fenced by f (nil: unfenced) as MappingWriter.Put is: checked
// before the write and again after it, a write that finds the claim lost
// then being taken back. It then has the volumed serving e's VM serve it;
// an export name another volume holds is a CONFLICT, and an export that
// cannot be served is removed again and fails.
func (h *Host) PutExport(ctx context.Context, f engine.Fence, e commands.Export) error {
	now := time.Now().UTC()
	e.CreatedAt, e.UpdatedAt = now, now
	var prev *commands.Export
	old, err := h.cfg.Store.GetExport(ctx, e.VolumeID)
	switch {
	case err == nil:
		e.CreatedAt, e.Revision = old.CreatedAt, old.Revision
		prev = &old
	case !errors.Is(err, state.ErrNotFound):
		return fmt.Errorf("%w: read export of %s: %w", engine.ErrStopped, e.VolumeID, err)
	}
	recs, err := h.exportsOf(ctx, e.VMID)
	if err != nil {
		return fmt.Errorf("%w: list exports of VM %s: %w", engine.ErrStopped, e.VMID, err)
	}
	for _, r := range recs {
		if r.ExportName == e.ExportName && r.VolumeID != e.VolumeID {
			return commands.Conflict("export name %s is taken by volume %s", e.ExportName, r.VolumeID).
				WithDetail("export_name", e.ExportName)
		}
	}
	if f != nil {
		if err := f.Check(ctx); err != nil {
			return err
		}
	}
	saved, err := h.cfg.Store.PutExport(ctx, e)
	if err != nil {
		return fmt.Errorf("%w: record export of %s: %w", engine.ErrStopped, e.VolumeID, err)
	}
	if f != nil {
		if ferr := f.Check(ctx); ferr != nil {
			h.undoPut(ctx, saved, prev, ferr)
			return ferr
		}
	}
	dropped, err := h.askHost(ctx, e.VMID, hostRequest{Action: hostSync, Change: &exportChange{Put: &saved}})
	if slices.Contains(dropped, e.VolumeID) {
		return commands.Internal("the NBD server cannot serve %s: %v", e.DevicePath, err).WithDetail("export_name", e.ExportName)
	}
	if err != nil {
		return hostError(err)
	}
	return nil
}

// undoPut puts back what an export write that lost its fence replaced:
// prev, or nothing when it created the record; only while the record is
// still at the revision the write left. The served set was not synced
// to the write, so the next sync serves the records as they stand.
func (h *Host) undoPut(ctx context.Context, saved commands.Export, prev *commands.Export, why error) {
	var err error
	if prev == nil {
		err = h.cfg.Store.DeleteExport(ctx, saved.VolumeID, saved.Revision)
	} else {
		back := *prev
		back.Revision = saved.Revision
		_, err = h.cfg.Store.PutExport(ctx, back)
	}
	switch {
	case errors.Is(err, state.ErrStale):
		h.log.Warn("late export write: a newer one replaced it already", "volume_id", saved.VolumeID, "why", why)
	case err != nil:
		h.log.Error("late export write could not be undone; the reconcile repairs it", "volume_id", saved.VolumeID, "err", err, "why", why)
	default:
		h.log.Warn("late export write undone", "volume_id", saved.VolumeID, "why", why)
	}
}

// hostError is the operation's error when the volumed serving a VM could
// not do its part.
func hostError(err error) error {
	if errors.Is(err, errNoHost) {
		return commands.Unavailable("%v (--nbd-listen is empty, or it is not running)", err)
	}
	return commands.Internal("sync NBD exports: %v", err)
}

// HasExport reports whether the volume has an export record.
func (h *Host) HasExport(ctx context.Context, volumeID string) (bool, error) {
	_, err := h.cfg.Store.GetExport(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// ExportUsers names the connected clients of the volume's NBD export, as
// the volumed serving its VM counts them; none without an export, or
// when no volumed serves its VM now (its NBD server went with it).
func (h *Host) ExportUsers(ctx context.Context, volumeID string) ([]commands.DeviceUser, error) {
	e, err := h.cfg.Store.GetExport(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", engine.ErrStopped, err)
	}
	rep, err := h.ask(ctx, e.VMID, hostRequest{Action: hostClients, Export: e.ExportName})
	switch {
	case errors.Is(err, errNoHost):
		return nil, nil
	case err != nil:
		return nil, commands.Unavailable("cannot count the clients of NBD export %s: %v", e.ExportName, err).
			WithDetail("export_name", e.ExportName)
	case rep.Clients == 0:
		return nil, nil
	}
	return []commands.DeviceUser{{Kind: commands.UserNBDClient, Device: e.DevicePath, Export: e.ExportName, Clients: rep.Clients}}, nil
}

// DropExport ends a volume's export, fenced by f (nil: unfenced): its
// record goes, then the volumed serving the export's VM syncs its served
// set, which refuses new clients and closes open ones. When none serves
// that VM (it is down), its NBD server went with it, and it restarts from
// the records. It returns the export name, "" when the volume had no
// export.
func (h *Host) DropExport(ctx context.Context, f engine.Fence, volumeID string) (string, error) {
	e, err := h.cfg.Store.GetExport(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("%w: read export of %s: %w", engine.ErrStopped, volumeID, err)
	}
	if f != nil {
		if err := f.Check(ctx); err != nil {
			return "", err
		}
	}
	if err := h.cfg.Store.DeleteExport(ctx, volumeID, e.Revision); err != nil {
		return "", fmt.Errorf("%w: delete export of %s: %w", engine.ErrStopped, volumeID, err)
	}
	if _, err := h.askHost(ctx, e.VMID, hostRequest{Action: hostSync, Change: &exportChange{Removed: volumeID}}); errors.Is(err, errNoHost) {
		h.log.Warn("export record removed; no volumed serves its VM now", "volume_id", volumeID, "vm_id", e.VMID)
	} else if err != nil {
		return "", commands.Internal("end NBD export %s: %v", e.ExportName, err).WithDetail("export_name", e.ExportName)
	}
	h.log.Info("export ended", "volume_id", volumeID, "export", e.ExportName)
	return e.ExportName, nil
}

// onMapping ends the export of a volume whose device on this host went
// away, as soon as the device side announces it on volumes.mappings.>.
func (h *Host) onMapping(msg *nats.Msg) {
	var m commands.Mapping
	if json.Unmarshal(msg.Data, &m) != nil || m.VMID != h.cfg.VMID || m.LinuxState == commands.LinuxDetected {
		return
	}
	ctx, cancel := context.WithTimeout(h.ctx, exportSyncTimeout)
	defer cancel()
	if name, err := h.DropExport(ctx, nil, m.VolumeID); err != nil {
		h.log.Warn("cannot end the export of a volume whose device went away", "volume_id", m.VolumeID, "err", err)
	} else if name != "" {
		h.log.Warn("export ended: its device went away", "volume_id", m.VolumeID, "export", name)
	}
}

// exportsOf returns the export records of one VM.
func (h *Host) exportsOf(ctx context.Context, vmID string) ([]commands.Export, error) {
	all, err := h.cfg.Store.ListExports(ctx)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(all, func(e commands.Export) bool { return e.VMID != vmID }), nil
}

// syncExports makes the served set this host's records. Records the
// exporter could not serve are deleted and returned; the error is then
// only logged. Syncs run one at a time.
func (h *Host) syncExports(ctx context.Context, change *exportChange) (dropped []string, err error) {
	h.exportMu.Lock()
	defer h.exportMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, exportSyncTimeout)
	defer cancel()
	recs, err := h.exportsOf(ctx, h.cfg.VMID)
	if err != nil {
		return nil, state.APIError(err)
	}
	recs = change.apply(recs, h.cfg.VMID)
	syncErr := h.cfg.Exporter.Sync(ctx, recs)
	served := h.cfg.Exporter.Clients()
	for _, e := range recs {
		if _, ok := served[e.ExportName]; ok {
			continue
		}
		if err := h.cfg.Store.DeleteExport(ctx, e.VolumeID, e.Revision); errors.Is(err, state.ErrStale) {
			continue // changed since it was listed: the next sync looks again
		} else if err != nil {
			return dropped, state.APIError(err)
		}
		dropped = append(dropped, e.VolumeID)
	}
	if len(dropped) > 0 {
		h.log.Warn("exports dropped: the NBD server cannot serve them", "volume_ids", dropped, "err", syncErr)
		return dropped, nil
	}
	return nil, syncErr
}

// Reconcile removes the export records whose mapping no longer
// allows an export and follows a mapping's new device path, then has the
// volumed serving each VM with exports sync its served set; it returns
// each repair in words. At Start it looks at this host's records only
// (all false); in the reconcile, which one instance runs, at every VM's.
func (h *Host) Reconcile(ctx context.Context, all bool) ([]string, error) {
	recs, err := h.cfg.Store.ListExports(ctx)
	if err != nil {
		return nil, state.APIError(err)
	}
	vms := map[string]bool{}
	if h.cfg.Exporter != nil {
		vms[h.cfg.VMID] = true
	}
	var changes []string
	local := 0
	for _, e := range recs {
		if !all && e.VMID != h.cfg.VMID {
			continue
		}
		vms[e.VMID] = true
		m, err := h.cfg.Store.GetMapping(ctx, e.VolumeID)
		want, why := h.exportable(m)
		switch {
		case errors.Is(err, state.ErrNotFound):
			why = "the volume has no mapping"
		case err != nil:
			return changes, state.APIError(err)
		case why == "" && m.VMID != e.VMID:
			why = fmt.Sprintf("the volume is attached to VM %s now", m.VMID)
		}
		if why != "" {
			if err := h.cfg.Store.DeleteExport(ctx, e.VolumeID, e.Revision); errors.Is(err, state.ErrStale) {
				continue // changed since it was listed: the next reconcile looks again
			} else if err != nil {
				return changes, state.APIError(err)
			}
			changes = append(changes, fmt.Sprintf("removed export %s of volume %s: %s", e.ExportName, e.VolumeID, why))
			continue
		}
		if want.ExportName != e.ExportName || want.DevicePath != e.DevicePath {
			e.ExportName, e.DevicePath, e.UpdatedAt = want.ExportName, want.DevicePath, time.Now().UTC()
			if _, err := h.cfg.Store.PutExport(ctx, e); errors.Is(err, state.ErrStale) {
				continue
			} else if err != nil {
				return changes, state.APIError(err)
			}
			changes = append(changes, fmt.Sprintf("export of volume %s now serves %s as %s", e.VolumeID, e.DevicePath, e.ExportName))
		}
		if e.VMID == h.cfg.VMID {
			local++
		}
	}
	resync := false
	if h.cfg.Exporter != nil {
		resync = len(h.cfg.Exporter.Clients()) != local
	}
	var errs []error
	for _, vm := range slices.Sorted(maps.Keys(vms)) {
		dropped, err := h.askHost(ctx, vm, hostRequest{Action: hostSync})
		for _, id := range dropped {
			changes = append(changes, fmt.Sprintf("removed export of volume %s: the NBD server cannot serve it", id))
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	if resync && len(changes) == 0 {
		changes = append(changes, "re-synced the NBD server's exports with the records")
	}
	return changes, errors.Join(errs...)
}

// AutoExport has the volumed serving the VM of a volume just attached and
// mapped export it, read-only, when that host's --nbd-auto-export asks for
// it, while the attach holds its operation (f); a failure is logged, the
// attach stands.
func (h *Host) AutoExport(ctx context.Context, f engine.Fence, m commands.Mapping) {
	if err := f.Check(ctx); err != nil {
		h.log.Warn("auto-export skipped: the attach no longer holds its operation", "volume_id", m.VolumeID, "err", err)
		return
	}
	if m.VMID == h.cfg.VMID {
		h.autoExportHere(ctx, f, m)
		return
	}
	if _, err := h.askHost(ctx, m.VMID, hostRequest{Action: hostAutoExport, Mapping: &m}); err != nil && !errors.Is(err, errNoHost) {
		h.log.Warn("auto-export on the volume's host failed", "volume_id", m.VolumeID, "vm_id", m.VMID, "err", err)
	}
}

// autoExportHere is autoExport on this host's NBD server, fenced by f
// when the attach runs here (nil when another volumed asked).
func (h *Host) autoExportHere(ctx context.Context, f engine.Fence, m commands.Mapping) {
	if !h.cfg.AutoExport || h.cfg.Exporter == nil {
		return
	}
	e, why := h.exportable(m)
	if why != "" {
		return
	}
	if _, err := h.cfg.Store.GetExport(ctx, m.VolumeID); err == nil {
		return // exported already, maybe read-write: keep it
	}
	e.ReadOnly = true
	if err := h.PutExport(ctx, f, e); err != nil {
		h.log.Warn("auto-export failed", "volume_id", m.VolumeID, "err", err)
		return
	}
	h.log.Info("volume auto-exported", "volume_id", m.VolumeID, "export", e.ExportName)
}

// Exports lists this host's exports with their connected clients; 503
// when the NBD server is off.
func (h *Host) Exports(ctx context.Context) ([]commands.Export, error) {
	if h.cfg.Exporter == nil {
		return nil, engine.ExportsOff()
	}
	recs, err := h.exportsOf(ctx, h.cfg.VMID)
	if err != nil {
		return nil, state.APIError(err)
	}
	clients := h.cfg.Exporter.Clients()
	for i := range recs {
		recs[i].Clients = clients[recs[i].ExportName]
	}
	return recs, nil
}

// Export is one volume's export with its connected clients; NOT_FOUND
// when the volume is not exported here.
func (h *Host) Export(ctx context.Context, volumeID string) (commands.Export, error) {
	if h.cfg.Exporter == nil {
		return commands.Export{}, engine.ExportsOff()
	}
	e, err := h.cfg.Store.GetExport(ctx, volumeID)
	if errors.Is(err, state.ErrNotFound) || (err == nil && e.VMID != h.cfg.VMID) {
		return commands.Export{}, commands.NotFound("volume %s is not exported on this host", volumeID).WithDetail("volume_id", volumeID)
	}
	if err != nil {
		return e, state.APIError(err)
	}
	e.Clients = h.cfg.Exporter.Clients()[e.ExportName]
	return e, nil
}
