package kinds

import (
	"context"
	"errors"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/state"
)

// Every kind takes its commands.
var (
	_ engine.Accepter = create{}
	_ engine.Accepter = attach{}
	_ engine.Accepter = detach{}
	_ engine.Accepter = remove{}
	_ engine.Accepter = export{}
	_ engine.Accepter = unexport{}
)

// List names one of CloudStack's cached lists.
type List int

// The lists the pre-checks read.
const (
	Zones List = iota
	Offerings
	VMs
)

// Catalog answers pre-checks from CloudStack's cached lists.
type Catalog interface {
	// Unlisted reports whether a list fresher than the question lacks id;
	// false when CloudStack could not be asked in time (the command goes
	// on unchecked).
	Unlisted(ctx context.Context, list List, id string) bool
}

// checkVolume answers 404 for a volume CloudStack does not know. When
// CloudStack does not answer within ctx, or cannot be reached, the command
// is accepted all the same: the queue retries it.
func (d Deps) checkVolume(ctx context.Context, volumeID string) error {
	_, err := d.CloudStack.GetVolume(ctx, volumeID)
	switch {
	case err == nil || csapi.IsRetryable(err) || ctx.Err() != nil:
		return nil
	case errors.Is(err, csapi.ErrNotFound):
		return engine.VolumeNotFound(volumeID)
	default:
		return engine.CloudStackError(err)
	}
}

// unknownParameter is CloudStack's answer to an id that names nothing:
// HTTP 431 with its invalid-parameter text, as a 422 CLOUDSTACK_ERROR.
func unknownParameter(command, what, param, value string) error {
	return commands.CloudStack("CloudStack %s failed: Invalid parameter %s", what, param).
		WithDetail("cloudstack_error_code", csapi.CodeParamError).
		WithDetail("cloudstack_message", csapi.InvalidParameterText(command, param, value))
}

// VMNotFound is the 404 for a VM CloudStack does not know.
func VMNotFound(vmID string) *commands.Error {
	return commands.NotFound("VM %s not found in CloudStack", vmID).WithDetail("vm_id", vmID)
}

func (create) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "create", Subject: commands.SubjectCreate}}
}

// Decode checks, as CloudStack's createVolume would, that the snapshot
// (of a create from one), the disk offering and the zone exist (in that
// order, as CloudStack checks them): 422 CLOUDSTACK_ERROR otherwise. A
// create from a snapshot may leave the offering and the zone out.
func (k create) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeCreate(data)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{Request: req, Check: func(_, ctx context.Context) error {
		if req.SnapshotID != "" {
			_, err := k.CloudStack.GetSnapshot(ctx, req.SnapshotID)
			switch {
			case errors.Is(err, csapi.ErrNotFound):
				return unknownParameter("createVolume", "volume creation", "snapshotid", req.SnapshotID)
			case err != nil && !csapi.IsRetryable(err) && ctx.Err() == nil:
				return engine.CloudStackError(err)
			}
		}
		for _, p := range []struct {
			list      List
			param, id string
		}{{Offerings, "diskofferingid", req.DiskOfferingID}, {Zones, "zoneid", req.ZoneID}} {
			if p.id == "" {
				continue // a create from a snapshot takes the snapshot's
			}
			if k.Catalog.Unlisted(ctx, p.list, p.id) {
				return unknownParameter("createVolume", "volume creation", p.param, p.id)
			}
		}
		return nil
	}}, nil
}

func (attach) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "attach", Subject: commands.SubjectAttach}, {Name: "attach-root", Subject: commands.SubjectAttachRoot}}
}

// Decode reads an attach, or an attach-root on its subject; a VM or a
// volume CloudStack does not know is 404.
func (k attach) Decode(_ context.Context, subject string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeAttach(data, subject == commands.SubjectAttachRoot)
	if err != nil {
		return engine.Command{}, err
	}
	vm := req.VMID
	return engine.Command{VolumeID: req.VolumeID, VMID: &vm, Request: req, Check: func(_, ctx context.Context) error {
		if k.Catalog.Unlisted(ctx, VMs, req.VMID) {
			return VMNotFound(req.VMID)
		}
		return k.checkVolume(ctx, req.VolumeID)
	}}, nil
}

// decodeVolume reads a command naming a volume CloudStack must know.
func (d Deps) decodeVolume(data []byte) (engine.Command, error) {
	req, err := commands.DecodeVolume(data)
	if err != nil {
		return engine.Command{}, err
	}
	return engine.Command{VolumeID: req.VolumeID, Request: req, Check: func(_, ctx context.Context) error {
		return d.checkVolume(ctx, req.VolumeID)
	}}, nil
}

func (detach) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "detach", Subject: commands.SubjectDetach}}
}

func (k detach) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	return k.decodeVolume(data)
}

func (remove) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "delete", Subject: commands.SubjectDelete}}
}

func (k remove) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	return k.decodeVolume(data)
}

func (export) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "export", Subject: commands.SubjectExport}}
}

// Decode reads an export: the volume must be known to CloudStack, mapped
// with its device found, and a volumed with an NBD server must serve its
// VM, whose id the operation records.
func (k export) Decode(_ context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeExport(data)
	if err != nil {
		return engine.Command{}, err
	}
	var vm string // the VM whose instance serves the export, once checked
	return engine.Command{VolumeID: req.VolumeID, VMID: &vm, Request: req, Check: func(ctx, checkCtx context.Context) error {
		// CloudStack within the check budget; the store and the host
		// within the command's own.
		if err := k.checkVolume(checkCtx, req.VolumeID); err != nil {
			return err
		}
		e, err := k.Exports.ExportFor(ctx, req.VolumeID)
		if err != nil {
			return err
		}
		if err := k.Exports.Ping(ctx, e.VMID); err != nil {
			return err
		}
		vm = e.VMID
		return nil
	}}, nil
}

func (unexport) Endpoints() []engine.Endpoint {
	return []engine.Endpoint{{Name: "unexport", Subject: commands.SubjectUnexport}}
}

// Decode reads an unexport: of a recorded export, on its VM; of none, on
// this host's, for a volume CloudStack knows (503 without an NBD server).
func (k unexport) Decode(ctx context.Context, _ string, data []byte) (engine.Command, error) {
	req, err := commands.DecodeVolume(data)
	if err != nil {
		return engine.Command{}, err
	}
	vm := k.Exports.VMID()
	e, err := k.Exports.Record(ctx, req.VolumeID)
	switch {
	case errors.Is(err, state.ErrNotFound):
		if !k.Exports.Serving() {
			return engine.Command{}, engine.ExportsOff()
		}
	case err != nil:
		return engine.Command{}, state.APIError(err)
	default:
		vm = e.VMID
	}
	recorded := err == nil
	return engine.Command{VolumeID: req.VolumeID, VMID: &vm, Request: req, Check: func(_, ctx context.Context) error {
		if recorded {
			return nil
		}
		return k.checkVolume(ctx, req.VolumeID)
	}}, nil
}
