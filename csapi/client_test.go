package csapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"testing"
	"time"
)

// Ids in the recorded samples.
const (
	sampleVolumeID = "3c5a2f1e-8b7d-4e2a-9f61-0d2b7c9e4a15"
	sampleVMID     = "915653c4-298b-4d74-bdee-4ced282114f1"
	sampleZoneID   = "1d8d87d4-1425-459c-8d81-c6f57dca2bd2"
)

func TestCreateVolumeAndWait(t *testing.T) {
	r, c := startReplay(t, map[string][]step{
		"createVolume": {{file: "createVolume_initial.json"}},
		"queryAsyncJobResult": {{file: "queryAsyncJobResult_pending.json"}, {file: "queryAsyncJobResult_pending.json"},
			{file: "queryAsyncJobResult_createVolume_success.json"}},
	})
	ctx := ctxTimeout(t, 10*time.Second)
	volID, jobID, err := c.CreateVolume(ctx, CreateParams{Name: "pvc-data-1", SizeGiB: 10, DiskOfferingID: "off", ZoneID: sampleZoneID})
	if err != nil {
		t.Fatal(err)
	}
	if volID != sampleVolumeID || jobID != "b2f4e8a0-1c3d-4e5f-8a9b-0c1d2e3f4a5b" {
		t.Errorf("CreateVolume = %q, %q", volID, jobID)
	}
	f := r.form(0)
	for k, want := range map[string]string{"command": "createVolume", "name": "pvc-data-1", "size": "10", "diskofferingid": "off", "zoneid": sampleZoneID} {
		if got := f.Get(k); got != want {
			t.Errorf("createVolume %s = %q, want %q", k, got, want)
		}
	}
	job, err := c.WaitJob(ctx, jobID)
	if err != nil {
		t.Fatal(err)
	}
	want := Volume{ID: sampleVolumeID, Name: "pvc-data-1", State: "Allocated", Type: "DATADISK", ZoneID: sampleZoneID,
		ZoneName: "zone1", Size: 10737418240, Created: "2025-01-10T10:00:00+0000"}
	if job.Status != JobSuccess || job.Volume == nil || !volumeEqual(*job.Volume, want) {
		t.Errorf("job = %+v volume %+v, want success with %+v", job, job.Volume, want)
	}
	if got := c.Calls(); got != 4 {
		t.Errorf("Calls = %d, want 4 (create + 3 polls)", got)
	}
}

func TestAttachDeviceID(t *testing.T) {
	cases := []struct {
		name     string
		deviceID *int64
		want     string // "" means no deviceid parameter
	}{
		{"CloudStack chooses", nil, ""},
		{"root disk 0 is sent", ptr(int64(0)), "0"},
		{"explicit 4", ptr(int64(4)), "4"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, c := startReplay(t, map[string][]step{"attachVolume": {{file: "attachVolume_initial.json"}}})
			jobID, err := c.AttachVolume(ctxTimeout(t, 10*time.Second), sampleVolumeID, sampleVMID, tc.deviceID)
			if err != nil || jobID != "c3a5f9b1-2d4e-4f60-9b0c-1d2e3f4a5b6c" {
				t.Fatalf("AttachVolume = %q, %v", jobID, err)
			}
			f := r.form(0)
			if _, has := f["deviceid"]; has != (tc.want != "") || f.Get("deviceid") != tc.want {
				t.Errorf("deviceid = %q (present %v), want %q", f.Get("deviceid"), has, tc.want)
			}
			if f.Get("id") != sampleVolumeID || f.Get("virtualmachineid") != sampleVMID {
				t.Errorf("attach params id=%q virtualmachineid=%q", f.Get("id"), f.Get("virtualmachineid"))
			}
		})
	}
}

// TestJobVolumeMapping: the job's volume carries the VM fields and device
// id only while attached.
func TestJobVolumeMapping(t *testing.T) {
	cases := []struct {
		file     string
		vmID     string
		vmName   string
		deviceID *int64
		attached string
	}{
		{"queryAsyncJobResult_attachVolume_success.json", sampleVMID, "testDummyVM", ptr(int64(1)), "2025-01-10T10:01:00+0000"},
		{"queryAsyncJobResult_detachVolume_success.json", "", "", nil, ""},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			_, c := startReplay(t, map[string][]step{"queryAsyncJobResult": {{file: tc.file}}})
			job, err := c.QueryJob(ctxTimeout(t, 10*time.Second), "j")
			if err != nil || job.Status != JobSuccess || job.Volume == nil {
				t.Fatalf("QueryJob = %+v, %v", job, err)
			}
			want := Volume{ID: sampleVolumeID, Name: "pvc-data-1", State: "Ready", Type: "DATADISK", ZoneID: sampleZoneID,
				ZoneName: "zone1", Size: 10737418240, Created: "2025-01-10T10:00:00+0000",
				VMID: tc.vmID, VMName: tc.vmName, DeviceID: tc.deviceID, Attached: tc.attached}
			if !volumeEqual(*job.Volume, want) {
				t.Errorf("volume = %s, want %s", show(*job.Volume), show(want))
			}
		})
	}
}

func TestDetachDeleteListPing(t *testing.T) {
	r, c := startReplay(t, map[string][]step{
		"detachVolume": {{file: "detachVolume_initial.json"}},
		"deleteVolume": {{file: "deleteVolume_success.json"}},
		"listVolumes":  {{file: "listVolumes.json"}, {file: "listVolumes_empty.json"}},
		"listZones":    {{file: "listZones.json"}},
		"listVirtualMachines": {{file: "cloudstack-go_v2.19.0_VirtualMachineService.json", key: "listVirtualMachines"},
			{file: "listVolumes_empty.json"}},
	})
	ctx := ctxTimeout(t, 10*time.Second)
	jobID, err := c.DetachVolume(ctx, sampleVolumeID)
	if err != nil || jobID != "d4b6a0c2-3e5f-4071-8c1d-2e3f4a5b6c7d" {
		t.Fatalf("DetachVolume = %q, %v", jobID, err)
	}
	if f := r.form(0); f.Get("id") != sampleVolumeID || f.Get("virtualmachineid") != "" || f.Get("deviceid") != "" {
		t.Errorf("detach params %v, want id only", f)
	}
	if err := c.DeleteVolume(ctx, sampleVolumeID); err != nil {
		t.Fatalf("DeleteVolume: %v", err)
	}
	vols, err := c.ListVolumes(ctx, ListFilter{VMID: sampleVMID, Name: "pvc-data-1", ZoneID: sampleZoneID})
	if err != nil || len(vols) != 1 || vols[0].DeviceID == nil || *vols[0].DeviceID != 1 || vols[0].VMName != "testDummyVM" {
		t.Fatalf("ListVolumes = %s, %v", show(vols), err)
	}
	f := r.form(2)
	for k, want := range map[string]string{"virtualmachineid": sampleVMID, "name": "pvc-data-1", "zoneid": sampleZoneID} {
		if f.Get(k) != want {
			t.Errorf("listVolumes %s = %q, want %q", k, f.Get(k), want)
		}
	}
	if _, err := c.GetVolume(ctx, sampleVolumeID); !errors.Is(err, ErrNotFound) || IsRetryable(err) {
		t.Errorf("GetVolume of an empty list: %v, want final ErrNotFound", err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Errorf("Ping: %v", err)
	}
	vm, err := c.GetVM(ctx, sampleVMID)
	if err != nil || vm != (VM{ID: sampleVMID, Name: "testDummyVM", State: "Running", ZoneID: sampleZoneID}) {
		t.Errorf("GetVM = %+v, %v", vm, err)
	}
	if _, err := c.GetVM(ctx, sampleVMID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetVM of an empty list: %v, want ErrNotFound", err)
	}
	if got := c.Calls(); got != 7 {
		t.Errorf("Calls = %d, want 7", got)
	}
}

// TestWaitJob covers the poll loop: first poll at once, transient errors
// retried, final ones returned, ctx ending the wait.
func TestWaitJob(t *testing.T) {
	pending := step{file: "queryAsyncJobResult_pending.json"}
	success := step{file: "queryAsyncJobResult_createVolume_success.json"}
	cases := []struct {
		name      string
		steps     []step
		timeout   time.Duration
		status    JobStatus
		calls     int64
		errCode   int
		retryable bool
		deadline  bool
	}{
		{name: "done at the first poll", steps: []step{success}, status: JobSuccess, calls: 1},
		{name: "530 and dropped connection are retried", steps: []step{pending, {status: 530, file: "error_530_internal.json"}, {drop: true}, success},
			status: JobSuccess, calls: 4},
		{name: "401 ends the wait", steps: []step{pending, {status: 401, file: "error_401_bad_signature.json"}, success},
			status: JobPending, calls: 2, errCode: 401},
		{name: "failed job", steps: []step{{file: "queryAsyncJobResult_attachVolume_failure.json"}}, status: JobFailure, calls: 1, errCode: 431},
		{name: "ctx ends while pending", steps: []step{pending}, timeout: 30 * time.Millisecond, status: JobPending,
			retryable: true, deadline: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, c := startReplay(t, map[string][]step{"queryAsyncJobResult": tc.steps})
			timeout := tc.timeout
			if timeout == 0 {
				timeout = 10 * time.Second
			}
			job, err := c.WaitJob(ctxTimeout(t, timeout), "j")
			if job.Status != tc.status || job.ID != "j" {
				t.Errorf("job = %+v, want status %d", job, tc.status)
			}
			if tc.calls != 0 && c.Calls() != tc.calls {
				t.Errorf("Calls = %d, want %d", c.Calls(), tc.calls)
			}
			// A call cut by the deadline may end before its request
			// reaches the server; more requests than calls is a hidden retry.
			if n := int64(r.requests()); n > c.Calls() || (!tc.deadline && n != c.Calls()) || (tc.deadline && n < c.Calls()-1) {
				t.Errorf("%d HTTP requests for %d calls: hidden retries", n, c.Calls())
			}
			var e *Error
			switch {
			case tc.errCode == 0 && !tc.deadline:
				if err != nil {
					t.Errorf("err = %v, want nil", err)
				}
			case !errors.As(err, &e):
				t.Errorf("err = %v, want *Error", err)
			case e.Code != tc.errCode || e.Retryable != tc.retryable:
				t.Errorf("err = %+v, want code %d retryable %v", e, tc.errCode, tc.retryable)
			}
			if tc.deadline && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("err = %v, want it to wrap context.DeadlineExceeded", err)
			}
			if tc.status == JobFailure && (job.Err == nil || job.Err != err) {
				t.Errorf("failed job: job.Err = %v, err = %v, want the same final error", job.Err, err)
			}
		})
	}
}

// TestListVolumesPages: a full page asks for the next one.
func TestListVolumesPages(t *testing.T) {
	const total = listPageSize + 3
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		page, _ := strconv.Atoi(r.FormValue("page"))
		size, _ := strconv.Atoi(r.FormValue("pagesize"))
		var vols []map[string]any
		for i := (page - 1) * size; i < min(total, page*size); i++ {
			vols = append(vols, map[string]any{"id": fmt.Sprintf("vol-%d", i), "size": 1 << 30})
		}
		json.NewEncoder(w).Encode(map[string]any{"listvolumesresponse": map[string]any{"count": total, "volume": vols}})
	}))
	t.Cleanup(srv.Close)
	c := New(Config{URL: srv.URL, APIKey: "k", SecretKey: "s"})
	vols, err := c.ListVolumes(ctxTimeout(t, 10*time.Second), ListFilter{})
	if err != nil || len(vols) != total || vols[total-1].ID != fmt.Sprintf("vol-%d", total-1) {
		t.Fatalf("ListVolumes: %d volumes, %v", len(vols), err)
	}
	if c.Calls() != 2 {
		t.Errorf("Calls = %d, want 2 pages", c.Calls())
	}
}

func ptr[T any](v T) *T { return &v }

// volumeEqual compares volumes, device ids by value.
func volumeEqual(a, b Volume) bool {
	if (a.DeviceID == nil) != (b.DeviceID == nil) || (a.DeviceID != nil && *a.DeviceID != *b.DeviceID) {
		return false
	}
	a.DeviceID, b.DeviceID = nil, nil
	return reflect.DeepEqual(a, b)
}

// show renders a value as JSON for failure messages.
func show(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
