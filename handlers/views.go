package handlers

import (
	"context"
	"errors"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/kinds"
	"github.com/volumed/volumed/state"
)

// probeTimeout bounds each dependency probe of Health.
const probeTimeout = 3 * time.Second

// VolumeStatus joins CloudStack's view of a volume, its mapping and its
// last operation.
func (s *Service) VolumeStatus(ctx context.Context, volumeID string) (commands.VolumeStatus, error) {
	vol, err := s.cfg.CloudStack.GetVolume(ctx, volumeID)
	if err != nil {
		if errors.Is(err, csapi.ErrNotFound) {
			return commands.VolumeStatus{}, engine.VolumeNotFound(volumeID)
		}
		return commands.VolumeStatus{}, engine.CloudStackError(err)
	}
	return s.volumeStatus(ctx, vol)
}

// volumeStatus is the whole VolumeStatus of a volume CloudStack listed.
func (s *Service) volumeStatus(ctx context.Context, vol csapi.Volume) (commands.VolumeStatus, error) {
	st, err := volumeRow(ctx, s.cfg.Store, s.cfg.Devices, vol)
	if err != nil {
		return st, err
	}
	st.CloudStackData = &commands.CloudStackData{
		ID: vol.ID, Name: vol.Name, State: vol.State, Type: vol.Type, ZoneName: vol.ZoneName,
		VirtualMachineID: vol.VMID, Attached: vol.Attached, DeviceID: vol.DeviceID, Size: vol.Size,
	}
	return st, nil
}

// volumeRow is the VolumeStatus without CloudStackData.
func volumeRow(ctx context.Context, store state.Reader, devices DeviceCorrelator, vol csapi.Volume) (commands.VolumeStatus, error) {
	st := commands.VolumeStatus{VolumeID: vol.ID, State: vol.State, Size: vol.Size, Tags: vol.Tags}
	if st.Tags == nil {
		st.Tags = map[string]string{}
	}
	if vol.VMID != "" {
		vm := vol.VMID
		st.VMID = &vm
	}
	m, err := state.GatedMapping(ctx, store, awaitStartCheck(devices), vol.ID)
	switch {
	case err == nil && m.DevicePath != "" && m.VMID == vol.VMID:
		path := m.DevicePath
		st.DevicePath = &path
		st.LinuxData = &commands.LinuxData{DevicePath: m.DevicePath, Size: m.Size, Controller: controller(devices, m)}
	case err != nil && !errors.Is(err, state.ErrNotFound):
		return st, state.APIError(err)
	}
	op, ok, err := state.FirstOperation(ctx, store, state.Filter{VolumeID: vol.ID})
	if err != nil {
		return st, state.APIError(err)
	}
	if ok {
		st.LastOperation = &commands.LastOperation{ID: op.ID, Type: op.Type, Status: op.Status}
	}
	return st, nil
}

// AwaitStartCheck waits until the mappings vmID had at start were checked
// against its devices (DeviceCorrelator.AwaitStartCheck); at once without
// a device side.
func (s *Service) AwaitStartCheck(ctx context.Context, vmID string) (bool, error) {
	return awaitStartCheck(s.cfg.Devices)(ctx, vmID)
}

// awaitStartCheck is devices' AwaitStartCheck; one that never waits
// without a device side.
func awaitStartCheck(devices DeviceCorrelator) func(ctx context.Context, vmID string) (bool, error) {
	if devices == nil {
		return func(context.Context, string) (bool, error) { return false, nil }
	}
	return devices.AwaitStartCheck
}

// controller names the bus of a mapped device, when the device agent
// knows it.
func controller(devices DeviceCorrelator, m commands.Mapping) string {
	if devices == nil {
		return ""
	}
	return devices.Controller(m.DevicePath)
}

// VMVolumes lists the volumes CloudStack has attached to a VM.
func (s *Service) VMVolumes(ctx context.Context, vmID string) ([]commands.VolumeStatus, error) {
	if _, err := s.cfg.CloudStack.GetVM(ctx, vmID); err != nil {
		if errors.Is(err, csapi.ErrNotFound) {
			return nil, kinds.VMNotFound(vmID)
		}
		return nil, engine.CloudStackError(err)
	}
	vols, err := s.cfg.CloudStack.ListVolumes(ctx, csapi.ListFilter{VMID: vmID})
	if err != nil {
		return nil, engine.CloudStackError(err)
	}
	out := make([]commands.VolumeStatus, 0, len(vols))
	for _, v := range vols {
		row, err := volumeRow(ctx, s.cfg.Store, s.cfg.Devices, v)
		if err != nil {
			return nil, err
		}
		row.LinuxData = nil // a list row, as the reference shows it
		out = append(out, row)
	}
	return out, nil
}

// Health probes CloudStack, the store and the device monitor.
func (s *Service) Health(ctx context.Context) commands.Health {
	h := commands.Health{Timestamp: time.Now().UTC(), DeviceMonitor: commands.NotConfigured,
		Details: commands.HealthDetails{ImplementationStatus: commands.ImplementationStatus, Store: s.cfg.StoreName,
			PollingInterval: time.Duration(0).String(), UptimeSeconds: int64(time.Since(s.started).Seconds())}}
	errs := map[string]string{}
	probe := func(name string, fn func(context.Context) error) string {
		pctx, cancel := context.WithTimeout(ctx, probeTimeout)
		defer cancel()
		if err := fn(pctx); err != nil {
			errs[name] = err.Error()
			return commands.Unhealthy
		}
		return commands.Healthy
	}
	h.CloudStackHealth = probe("cloudstack", s.cfg.CloudStack.Ping)
	h.DatabaseHealth = probe("database", s.cfg.Store.Ping)
	if h.DatabaseHealth == commands.Healthy {
		if st, err := s.cfg.Store.Stats(ctx); err == nil {
			h.Details.ActiveOperations = st.ByStatus[commands.StatusPending] + st.ByStatus[commands.StatusExecuting]
		}
	}
	if s.cfg.Devices != nil {
		health, count, interval, _ := s.cfg.Devices.Status()
		h.DeviceMonitor, h.Details.DeviceCount, h.Details.PollingInterval = health, count, interval.String()
		if health != commands.Healthy {
			errs["device_monitor"] = health
		}
	}
	switch {
	case h.DatabaseHealth != commands.Healthy:
		h.Status = commands.Unhealthy
	case h.CloudStackHealth != commands.Healthy || (h.DeviceMonitor != commands.Healthy && h.DeviceMonitor != commands.NotConfigured):
		h.Status = commands.Degraded
	default:
		h.Status = commands.Healthy
	}
	if len(errs) > 0 {
		h.Details.Errors = errs
	}
	return h
}

// Metrics counts operations (from the store, so across restarts) and this
// process's calls.
func (s *Service) Metrics(ctx context.Context) (commands.Metrics, error) {
	st, err := s.cfg.Store.Stats(ctx)
	if err != nil {
		return commands.Metrics{}, state.APIError(err)
	}
	mappings, err := s.cfg.Store.ListMappings(ctx, "")
	if err != nil {
		return commands.Metrics{}, state.APIError(err)
	}
	m := commands.Metrics{
		Timestamp: time.Now().UTC(), TotalOperations: st.Total,
		PendingOperations:  st.ByStatus[commands.StatusPending],
		ActiveMappings:     int64(len(mappings)),
		OperationsByType:   map[string]int64{},
		OperationsByStatus: map[string]int64{},
		Details: commands.MetricsDetails{
			CloudStackAPICalls:   s.cfg.CloudStack.Calls(),
			DatabaseTransactions: st.Writes,
			UptimeSeconds:        int64(time.Since(s.started).Seconds()),
		},
	}
	for _, t := range commands.OpTypes {
		m.OperationsByType[string(t)] = st.ByType[t]
	}
	for _, x := range commands.OpStatuses {
		m.OperationsByStatus[string(x)] = st.ByStatus[x]
	}
	if st.Terminal > 0 {
		m.AverageResponseTimeMs = float64(st.TerminalDuration.Milliseconds()) / float64(st.Terminal)
		m.ErrorRatePercent = 100 * float64(st.ByStatus[commands.StatusFailed]) / float64(st.Terminal)
	}
	if s.cfg.Devices != nil {
		_, _, _, m.Details.DeviceEventsProcessed = s.cfg.Devices.Status()
	}
	return m, nil
}

// Exports lists this host's exports with their connected clients; 503
// when the NBD server is off.
func (s *Service) Exports(ctx context.Context) ([]commands.Export, error) { return s.host.Exports(ctx) }

// Export is one volume's export with its connected clients; NOT_FOUND
// when the volume is not exported here.
func (s *Service) Export(ctx context.Context, volumeID string) (commands.Export, error) {
	return s.host.Export(ctx, volumeID)
}
