{#
  not_in: fails on every row whose column value is also a value of `field` in `to` (the opposite of
  relationships): e.g. no final pair's judgement is a control pair's judgement. Nulls are not counted.
#}
{% test not_in(model, column_name, to, field) %}
select {{ column_name }} as also_in_other, *
from {{ model }}
where {{ column_name }} is not null
  and {{ column_name }} in (select {{ field }} from {{ to }} where {{ field }} is not null)
{% endtest %}
