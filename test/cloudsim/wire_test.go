package cloudsim_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// valueKeys are compared by value, not only by JSON type.
var valueKeys = []string{"state", "type", "hypervisor", "jobstatus", "jobresultcode", "jobinstancetype",
	"jobresulttype", "cmd", "errorcode", "cserrorcode", "errortext", "success", "deviceid", "count"}

// sameShape fails unless got has exactly want's keys, with the same JSON
// types, recursively (and the same values for valueKeys).
func sameShape(t *testing.T, path string, want, got any) {
	t.Helper()
	if fmt.Sprintf("%T", want) != fmt.Sprintf("%T", got) {
		t.Errorf("%s: type %T, want %T (%v)", path, got, want, got)
		return
	}
	switch w := want.(type) {
	case map[string]any:
		g := got.(map[string]any)
		for k := range w {
			if _, ok := g[k]; !ok {
				t.Errorf("%s: missing key %q", path, k)
			}
		}
		for k := range g {
			if _, ok := w[k]; !ok {
				t.Errorf("%s: extra key %q", path, k)
			}
		}
		for k, wv := range w {
			gv, ok := g[k]
			if !ok {
				continue
			}
			if slices.Contains(valueKeys, k) && fmt.Sprint(wv) != fmt.Sprint(gv) {
				t.Errorf("%s.%s = %v, want %v", path, k, gv, wv)
			}
			sameShape(t, path+"."+k, wv, gv)
		}
	case []any:
		g := got.([]any)
		if len(w) > 0 && len(g) > 0 {
			sameShape(t, path+"[0]", w[0], g[0])
		}
		if (len(w) == 0) != (len(g) == 0) {
			t.Errorf("%s: %d items, want %d", path, len(g), len(w))
		}
	}
}

// TestWireMatchesFixtures replays each recorded sample's situation and
// checks the simulator's answer has the sample's shape, status and texts.
func TestWireMatchesFixtures(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	fixtures := map[string]bool{}
	files, _ := filepath.Glob(filepath.Join("testdata", "fixtures", "*.json"))
	for _, f := range files {
		fixtures[strings.TrimSuffix(filepath.Base(f), ".json")] = false
	}

	check := func(name string, status int, body []byte) map[string]any {
		t.Helper()
		raw, err := os.ReadFile(filepath.Join("testdata", "fixtures", name+".json"))
		if err != nil {
			t.Fatal(err)
		}
		fixtures[name] = true
		var want, got map[string]any
		if err := json.Unmarshal(raw, &want); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(body, &got); err != nil {
			t.Fatalf("%s: answer %s: %v", name, body, err)
		}
		wantStatus := 200
		for _, inner := range want {
			if code, ok := inner.(map[string]any)["errorcode"]; ok {
				wantStatus = int(code.(float64))
			}
		}
		if status != wantStatus {
			t.Errorf("%s: HTTP %d, want %d", name, status, wantStatus)
		}
		sameShape(t, name, want, got)
		for _, inner := range got {
			return inner.(map[string]any)
		}
		return nil
	}
	call := func(command string, params map[string]string) (int, []byte) {
		return signedRequest(t, s, s.SecretKey(), v3(s, command, params))
	}
	job := func(id string) (int, []byte) {
		var status int
		var body []byte
		testenv.Eventually(t, 10*time.Second, func() bool {
			status, body = call("queryAsyncJobResult", map[string]string{"jobid": id})
			return !strings.Contains(string(body), `"jobstatus":0`)
		}, "job %s ends", id)
		return status, body
	}
	create := map[string]string{"name": "pvc-data-1", "diskofferingid": cloudsim.CustomOfferingID, "zoneid": cloudsim.ZoneID, "size": "10"}

	// A job that is still running.
	if err := s.SetFaults(cloudsim.Faults{JobDuration: map[string]cloudsim.Duration{"createVolume": cloudsim.Duration(time.Hour)}}); err != nil {
		t.Fatal(err)
	}
	st, b := call("createVolume", create)
	pending := check("createVolume_initial", st, b)
	st, b = call("queryAsyncJobResult", map[string]string{"jobid": pending["jobid"].(string)})
	check("queryAsyncJobResult_pending", st, b)
	if err := s.SetFaults(cloudsim.Faults{}); err != nil {
		t.Fatal(err)
	}

	_, b = call("createVolume", create)
	var cr map[string]map[string]string
	if err := json.Unmarshal(b, &cr); err != nil {
		t.Fatal(err)
	}
	vol, createJob := cr["createvolumeresponse"]["id"], cr["createvolumeresponse"]["jobid"]
	st, b = job(createJob)
	check("queryAsyncJobResult_createVolume_success", st, b)

	st, b = call("attachVolume", map[string]string{"id": vol, "virtualmachineid": cloudsim.RemoteVMID})
	att := check("attachVolume_initial", st, b)
	st, b = job(att["jobid"].(string))
	check("queryAsyncJobResult_attachVolume_success", st, b)
	st, b = call("listVolumes", map[string]string{"id": vol})
	check("listVolumes", st, b)

	_, b = call("attachVolume", map[string]string{"id": vol, "virtualmachineid": cloudsim.RemoteVMID})
	var again map[string]map[string]string
	if err := json.Unmarshal(b, &again); err != nil {
		t.Fatal(err)
	}
	st, b = job(again["attachvolumeresponse"]["jobid"])
	check("queryAsyncJobResult_attachVolume_failure", st, b)
	st, b = call("deleteVolume", map[string]string{"id": vol})
	check("deleteVolume_error_attached_431", st, b)

	st, b = call("detachVolume", map[string]string{"id": vol})
	det := check("detachVolume_initial", st, b)
	st, b = job(det["jobid"].(string))
	check("queryAsyncJobResult_detachVolume_success", st, b)
	st, b = call("deleteVolume", map[string]string{"id": vol})
	check("deleteVolume_success", st, b)
	st, b = call("listVolumes", map[string]string{"id": vol})
	check("listVolumes_empty", st, b)
	st, b = call("listVolumes", map[string]string{"id": "00000000-0000-0000-0000-000000000000"})
	check("listVolumes_error_unknown_id_431", st, b)
	st, b = call("listZones", nil)
	check("listZones", st, b)

	// createTags' job answers as cloudstack-go's own sample of it
	// (test/testdata/ResourcetagsService.json): {"success": true}, no
	// instance; createSnapshot answers {id, jobid} at once.
	tagged := createVolume(t, syncClient(s), "tagged", 1)
	st, b = call("createTags", map[string]string{"resourceids": tagged, "resourcetype": "Volume", "tags[0].key": "k", "tags[0].value": "v"})
	var ct map[string]map[string]string
	if err := json.Unmarshal(b, &ct); err != nil || st != 200 {
		t.Fatalf("createTags: %d %s", st, b)
	}
	st, b = job(ct["createtagsresponse"]["jobid"])
	check("queryAsyncJobResult_createTags_success", st, b)
	if _, text := attach(t, syncClient(s), tagged, cloudsim.RemoteVMID, -1); text != "" {
		t.Fatal(text)
	}
	st, b = call("createSnapshot", map[string]string{"volumeid": tagged})
	check("createSnapshot_initial", st, b)
	st, b = signedRequest(t, s, "wrong-secret", v3(s, "attachVolume", map[string]string{"id": vol, "virtualmachineid": cloudsim.RemoteVMID}))
	check("error_401_bad_signature", st, b)

	for name, seen := range fixtures {
		if !seen {
			t.Errorf("fixture %s not checked", name)
		}
	}
}

// TestSignatures checks the cases of testdata/signature_cases.json.
func TestSignatures(t *testing.T) {
	s := startSim(t, cloudsim.Config{})
	raw, err := os.ReadFile(filepath.Join("testdata", "signature_cases.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cases []struct {
		Name          string
		Drop          []string
		Set           map[string]string
		Tamper        map[string]string
		Secret        string
		Expires       string
		ExpiresLayout string
		NoSignature   bool
		Want          int
	}
	if err := json.Unmarshal(raw, &cases); err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			v := v3(s, "listVolumes", map[string]string{"name": "x"})
			if tc.Expires != "" {
				d, err := time.ParseDuration(tc.Expires)
				if err != nil {
					t.Fatal(err)
				}
				layout := time.RFC3339
				if tc.ExpiresLayout != "" {
					layout = tc.ExpiresLayout
				}
				v.Set("expires", time.Now().UTC().Add(d).Format(layout))
			}
			for _, k := range tc.Drop {
				v.Del(k)
			}
			for k, x := range tc.Set {
				v.Set(k, x)
			}
			secret := s.SecretKey()
			if tc.Secret != "" {
				secret = tc.Secret
			}
			var status int
			var body []byte
			switch {
			case tc.NoSignature:
				status, body = rawGet(t, s.URL()+"?"+v.Encode())
			case len(tc.Tamper) > 0:
				// Sign the original, send changed parameters with that signature.
				signed := v3(s, "listVolumes", map[string]string{"name": "x"})
				status, body = signedRequestTampered(t, s, secret, signed, tc.Tamper)
			default:
				status, body = signedRequest(t, s, secret, v)
			}
			if status != tc.Want {
				t.Fatalf("HTTP %d (%s), want %d", status, body, tc.Want)
			}
			if tc.Want == 401 && !strings.Contains(string(body), "unable to verify user credentials and/or request signature") {
				t.Fatalf("401 body %s", body)
			}
		})
	}
}
