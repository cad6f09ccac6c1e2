// Command joule-kstatus prints the kstatus result of each Kubernetes object it reads.
//
// It is how Flux (kustomize-controller's wait and healthChecks), kpt and cli-utils' own
// apply tooling decide whether an object is ready: sigs.k8s.io/cli-utils/pkg/kstatus/status
// Compute, run here on objects read from stdin, so that Joule's tests check the operator's
// status conditions with the very code those tools run.
//
// Input: a stream of YAML documents (separated by ---) or of JSON values (one per line, or
// concatenated); a List (kind ending in "List", as `kubectl get -o json` prints) stands for
// its items. Output: one JSON object per input object, in order:
//
//	{"kind":"TrainingJob","namespace":"ns","name":"a","status":"Current","message":"..."}
//
// status is one of InProgress, Failed, Current, Terminating, NotFound, Unknown. An object
// kstatus cannot read (a malformed field) is reported as Unknown with the error as message;
// input that does not parse at all exits 1.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: joule-kstatus < objects.{yaml,json}")
		os.Exit(2)
	}
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "joule-kstatus:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	dec := utilyaml.NewYAMLOrJSONDecoder(bufio.NewReader(in), 4096)
	w := bufio.NewWriter(out)
	defer w.Flush()
	enc := json.NewEncoder(w)
	for n := 1; ; n++ {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("object %d: %w", n, err)
		}
		if len(raw) == 0 || string(raw) == "null" { // an empty YAML document
			continue
		}
		// apimachinery's json keeps whole numbers as int64: kstatus reads
		// metadata.generation and status.observedGeneration with NestedInt64, which
		// refuses the float64 that encoding/json would give.
		var obj map[string]interface{}
		if err := utiljson.Unmarshal(raw, &obj); err != nil {
			return fmt.Errorf("object %d is not a JSON/YAML object: %w", n, err)
		}
		for _, item := range expand(obj) {
			if err := enc.Encode(compute(item)); err != nil {
				return err
			}
		}
	}
}

// expand turns a List into its items; any other object stands for itself.
func expand(obj map[string]interface{}) []map[string]interface{} {
	kind, _ := obj["kind"].(string)
	items, isList := obj["items"].([]interface{})
	if !isList || !strings.HasSuffix(kind, "List") {
		return []map[string]interface{}{obj}
	}
	out := make([]map[string]interface{}, 0, len(items))
	for _, item := range items {
		if m, ok := item.(map[string]interface{}); ok {
			out = append(out, expand(m)...)
		}
	}
	return out
}

func compute(obj map[string]interface{}) result {
	u := &unstructured.Unstructured{Object: obj}
	r := result{Kind: u.GetKind(), Namespace: u.GetNamespace(), Name: u.GetName()}
	res, err := status.Compute(u)
	if err != nil {
		r.Status, r.Message = string(status.UnknownStatus), err.Error()
		return r
	}
	r.Status, r.Message = string(res.Status), res.Message
	return r
}
