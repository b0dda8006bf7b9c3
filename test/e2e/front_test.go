package e2e_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/test/cloudsim"
)

// callKeyed does one REST request with an Idempotency-Key, validated
// against the OpenAPI document.
func (d *daemon) callKeyed(method, path, key string, body any) (*http.Response, []byte) {
	d.t.Helper()
	data, err := json.Marshal(body)
	if err != nil {
		d.t.Fatal(err)
	}
	req, err := http.NewRequest(method, d.api+path, strings.NewReader(string(data)))
	if err != nil {
		d.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(commands.IdempotencyKeyHeader, key)
	return validator.Do(d.t, http.DefaultClient, req)
}

// TestFrontDoorREST: over REST through the real binary, a retried create
// with the same Idempotency-Key is the same operation, another body with
// it is 409, and a create in an unknown zone is CloudStack's 422 with
// nothing recorded.
func TestFrontDoorREST(t *testing.T) {
	sim := startSim(t, cloudsim.Config{})
	d := startDaemon(t, sim, daemonOpts{})
	body := map[string]any{"name": "keyed", "size": 1 << 30, "disk_offering_id": cloudsim.CustomOfferingID, "zone_id": cloudsim.ZoneID}
	var first, again commands.Operation
	for _, op := range []*commands.Operation{&first, &again} {
		resp, data := d.callKeyed(http.MethodPost, "/volumes", "e2e-key-1", body)
		if resp.StatusCode != http.StatusCreated || json.Unmarshal(data, op) != nil {
			t.Fatalf("keyed create: %d %s", resp.StatusCode, data)
		}
	}
	if first.ID != again.ID {
		t.Fatalf("retried create answered %s, then %s", first.ID, again.ID)
	}
	body["name"] = "keyed-other"
	resp, data := d.callKeyed(http.MethodPost, "/volumes", "e2e-key-1", body)
	var e commands.Error
	if resp.StatusCode != http.StatusConflict || json.Unmarshal(data, &e) != nil || e.Details["idempotency_key"] != "e2e-key-1" ||
		e.Details["operation_id"] != first.ID {
		t.Fatalf("other body with the key: %d %s", resp.StatusCode, data)
	}
	d.completed(first.ID)

	const unknownZone = "0e0e0e0e-1111-4222-8333-444455556666"
	body["zone_id"] = unknownZone
	status, data := d.call(http.MethodPost, "/volumes", body)
	if status != http.StatusUnprocessableEntity || json.Unmarshal(data, &e) != nil || e.Code != commands.CodeCloudStackError ||
		e.Message != "CloudStack volume creation failed: Invalid parameter zoneid" || e.Details["cloudstack_error_code"] != float64(431) ||
		!strings.Contains(e.Details["cloudstack_message"].(string), "Invalid parameter zoneid value="+unknownZone) {
		t.Fatalf("create in an unknown zone: %d %s", status, data)
	}
	var ops []commands.OperationSummary
	d.mustCall(http.StatusOK, http.MethodGet, "/operations", nil, &ops)
	if len(ops) != 1 || ops[0].ID != first.ID {
		t.Fatalf("operations recorded: %+v", ops)
	}
	if n := sim.Stats().Calls["createVolume"]; n != 1 {
		t.Fatalf("createVolume called %d times", n)
	}
}
