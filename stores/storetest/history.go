package storetest

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/volumed/volumed/commands"
)

// History is a retained history of terminal operations, the same every
// run: types and terminal statuses in turn, over Volumes volumes, VMs VMs
// and Callers requesters, the i-th created Step after the (i-1)-th from
// Start (make bench-scale and the state store's full-read benchmark).
type History struct {
	Volumes, VMs, Callers int
	Start                 time.Time
	Step                  time.Duration
}

// HistoryUUID is the i-th UUID of a kind (volume 1, VM 2, operation 3,
// job 4).
func HistoryUUID(kind, i int) string { return fmt.Sprintf("%08x-0000-4000-8000-%012x", kind, i) }

// Volume is the volume of the i-th operation.
func (h History) Volume(i int) string { return HistoryUUID(1, i%h.Volumes) }

// VM is the VM of the i-th operation.
func (h History) VM(i int) string { return HistoryUUID(2, i%h.VMs) }

// Caller is the requester of the i-th operation.
func (h History) Caller(i int) string {
	return fmt.Sprintf("api-token:bench-%d@127.0.0.1", i%h.Callers)
}

// ID is the id of the i-th operation.
func (h History) ID(i int) string {
	// Its first 4 bytes spread as a random UUID's do (the embedded store's
	// index buckets ids by them), its last ones are i.
	return fmt.Sprintf("op-%08x-0000-4000-8000-%012x", uint32(i)*2654435761, i)
}

// Created is when the i-th operation was created.
func (h History) Created(i int) time.Time { return h.Start.Add(time.Duration(i) * h.Step) }

// Op is the i-th operation, with the payload volumed records: a VM for
// attaches and detaches, a response or an error.
func (h History) Op(i int) commands.Operation {
	typ := commands.OpTypes[i%len(commands.OpTypes)]
	status := commands.StatusCompleted
	switch round := i / len(commands.OpTypes); {
	case round%10 == 3:
		status = commands.StatusFailed
	case round%50 == 7:
		status = commands.StatusCancelled
	}
	vol, vm := h.Volume(i), h.VM(i)
	created := h.Created(i)
	done := created.Add(3 * time.Second)
	dev := int64(1 + i%14)
	op := commands.Operation{ID: h.ID(i), Type: typ, Status: status, VolumeID: vol,
		Request: json.RawMessage(fmt.Sprintf(`{"volume_id":%q,"vm_id":%q}`, vol, vm)),
		Step:    string(typ) + ":done", JobID: HistoryUUID(4, i), Attempts: 1, RequestedBy: h.Caller(i),
		CreatedAt: created, UpdatedAt: done, CompletedAt: &done}
	if typ == commands.OpAttach || typ == commands.OpDetach {
		op.VMID = &vm
	}
	if status == commands.StatusCompleted {
		op.Response = &commands.OpResponse{VolumeID: vol, VMID: vm, DevicePath: "/dev/vdb", DeviceID: &dev,
			Message: "Volume attached successfully"}
	} else {
		op.Error = "cloudstack: job failed: bench"
	}
	return op
}
